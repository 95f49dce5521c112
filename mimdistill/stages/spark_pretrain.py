"""SparK pixel pre-training of a CNN (keyu-tian/SparK `pretrain/main.py`) on
the shared loop.

Reads top to bottom:
  1. `validate` (and `check_student`, which the heterogeneous distillation
     stage shares): the CNN section, an image size that is a multiple of 32,
     a mask ratio that leaves visible and masked cells, the optimizer;
  2. the model: `factory.build('spark', config.model)`, params `encoder`
     (the CNN, timm names), `densify_*`, `mask_tokens_*`, `dense_decoder`;
     BatchNorm statistics in `model_state['batch_stats']`;
  3. `build_task`: the mask drawn per example from the step key (a pure
     function of (seed, step): the same on 1 or 1000 devices, across
     restarts), SparK's masked-patch pixel loss, LAMB with SparK's param
     groups, SparK's lr and weight-decay schedules;
  4. `run`: data (RandomResizedCrop scale (0.67, 1) + flip, SparK's
     pre-training augmentation), the loop, `spark_reconstructions.png`.

Under `jax.jit` with the batch sharded over devices the sparse BatchNorm
statistics are those of the global batch (SparK's SyncBN).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimdistill.data import input_pipeline, sources
from mimdistill.data.transforms import normalize
from mimdistill.models import cnn_zoo, factory, sparse
from mimdistill.models.spark import SparK
from mimdistill.objectives.spark_loss import spark_loss
from mimdistill.paths import as_path
from mimdistill.stages.synthetic import Synthetic
from mimdistill.training import cnn_optimizer, run_config
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib
from mimdistill.training.spark_schedules import spark_lr, spark_weight_decay

log = logging.getLogger("mimdistill")
STAGE = "spark_pretrain"


# -----------------------------------------------------------------------------
# 1. Validation (shared with stages/hetero_distill.py)
# -----------------------------------------------------------------------------
def check_student(config: ml_collections.ConfigDict) -> int:
  """Checks the CNN student, its image size and mask ratio; returns the
  side of the stride-32 mask grid."""
  factory.compute_dtype(config.dtype)
  run_config.validate(config)
  factory.build("spark", config.model, dtype=config.dtype)  # unknown depth / variant / fields
  width = config.model.decoder_width
  if not isinstance(width, int) or width < sparse.DOWNSAMPLE_RATIO:
    raise ValueError(
      f"model.decoder_width={width!r} must be an integer >= {sparse.DOWNSAMPLE_RATIO} (the "
      "decoder halves it at each of its 2x upsamplings to the image; SparK: 768)"
    )
  if config.model.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={config.model.image_size} differs from "
      f"data.image_size={config.data.image_size}; set both alike"
    )
  grid = sparse.grid_size(config.data.image_size)
  ratio = config.mask_ratio
  if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
    raise ValueError(f"mask_ratio={ratio!r} must be in (0, 1)")
  kept = sparse.num_kept(grid, float(ratio))
  if not 0 < kept < grid * grid:
    raise ValueError(
      f"mask_ratio={ratio} keeps {kept} of the {grid}x{grid} mask cells at image size "
      f"{config.data.image_size}; it must leave at least one visible and one masked cell: "
      f"use a ratio in ({1 / (grid * grid):.3g}, {1 - 1 / (grid * grid):.3g}) or larger images"
    )
  cnn_optimizer.check(config.optimizer)
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))
  return grid


def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  """Every check that can fail before data is read or anything compiles."""
  check_student(config)
  if data:
    sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)


# -----------------------------------------------------------------------------
# 2. Model
# -----------------------------------------------------------------------------
def build_model(config) -> SparK:
  return factory.build("spark", config.model, dtype=config.dtype)


def student_signature(config) -> dict:
  """The CNN student's identity for the workdir record (`family` marks a
  CNN workdir: a ViT stage refuses it as a teacher)."""
  fields = cnn_zoo.fields_of_section(config.model)
  fields.update(
    image_size=config.model.image_size,
    decoder_width=config.model.decoder_width,
    densify_norm=config.model.densify_norm,
  )
  return fields


def draw_active(rng: jax.Array, batch: int, grid: int, mask_ratio: float) -> jax.Array:
  """SparK's mask per example, `(B, f, f)` bool (True = visible)."""
  return sparse.random_active(rng, batch, grid, mask_ratio)


def dummy_inputs(config) -> tuple[jax.Array, jax.Array]:
  size = config.data.image_size
  grid = sparse.grid_size(size)
  return jnp.zeros((1, size, size, 3)), jnp.ones((1, grid, grid), bool)


# -----------------------------------------------------------------------------
# 3. Task
# -----------------------------------------------------------------------------
def spark_warmup(warmup: int, total: int) -> int:
  """SparK's cosine phase needs a step after the warmup: a warmup covering a
  (very short) run ends 2 steps before its end."""
  return min(warmup, max(total - 2, 0))


def schedules(config, steps_per_epoch: int):
  """(total steps, SparK's lr schedule, its weight-decay schedule)."""
  total, warmup = run_config.steps(config, steps_per_epoch)
  lr = spark_lr(run_config.peak_lr(config), spark_warmup(warmup, total), total)
  o = config.optimizer
  return total, lr, spark_weight_decay(o.weight_decay, o.weight_decay_end, total)


def build_task(config, model: SparK, steps_per_epoch: int) -> loop_lib.Task:
  total, schedule, weight_decay = schedules(config, steps_per_epoch)
  grid = sparse.grid_size(config.data.image_size)
  ratio = float(config.mask_ratio)
  dummy = dummy_inputs(config)

  def init_variables(rng):
    return model.init({"params": rng}, *dummy)

  def loss_fn(params, model_state, batch, rng, inputs):
    images = normalize(batch["image"])
    mask_rng, drop_rng = jax.random.split(rng)
    active = draw_active(mask_rng, images.shape[0], grid, ratio)
    out, updates = model.apply(
      {"params": params, **model_state},
      images,
      active,
      train=True,
      rngs={"drop_path": drop_rng},
      mutable=["batch_stats"],
    )
    loss = spark_loss(out.rec, images, active).loss
    return loss, ({}, {**model_state, **updates})

  return loop_lib.Task(
    name=STAGE,
    init_variables=init_variables,
    loss_fn=loss_fn,
    make_optimizer=lambda params, sched: cnn_optimizer.from_config(
      params, sched, config.optimizer, weight_decay=weight_decay
    ),
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    accumulate_steps=config.optimizer.accumulate_steps,
    signature={"stage": STAGE, "model": student_signature(config), "mask_ratio": ratio},
  )


def random_batch(config, rng: np.random.Generator) -> dict:
  size, b = config.data.image_size, config.batch_size
  return {
    "image": rng.standard_normal((b, size, size, 3), dtype=np.float32),
    "label": np.zeros((b,), np.int32),
  }


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The task on a random batch (no data read), for the benchmark."""
  validate(config, data=False)
  task = build_task(config, build_model(config), steps_per_epoch)
  fields = cnn_zoo.fields_of_section(config.model)
  info = {
    "image_size": config.data.image_size,
    "fused_attention": False,
    "remat": False,
    "scan_blocks": False,
    "model": f"SparK {fields} + LightDecoder w{config.model.decoder_width}, "
    f"mask {config.mask_ratio}",
  }
  return Synthetic(STAGE, task, random_batch(config, np.random.default_rng(config.seed)), info, [])


# -----------------------------------------------------------------------------
# 4. Run
# -----------------------------------------------------------------------------
def eval_images(config, count: int) -> np.ndarray:
  """The first `count` eval images (on process 0), normalised."""
  n = jax.device_count()
  cfg = run_config.data_config(config, "eval", batch_size=-(-count // n) * n)
  cfg.num_workers = 0
  data = input_pipeline.make_dataset(
    cfg,
    split=config.data.eval_split,
    train=False,
    seed=config.seed,
    process_index=0,
    process_count=1,
  )
  return np.asarray(normalize(data.first_batch()["image"][:count]))


def pretrain_data(config, mesh):
  return input_pipeline.make_dataset(
    run_config.data_config(config, "mae"),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )


def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
  """Runs (or resumes) SparK pre-training in `workdir`; returns a summary."""
  validate(config)
  workdir = as_path(workdir)
  model = build_model(config)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = pretrain_data(config, mesh)
  task = build_task(config, model, train_data.steps_per_epoch)
  result = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=lineage or {"stage": STAGE, "parent": None},
  )
  if config.num_visualize:
    from mimdistill.visualize import hetero_maps

    state = hetero_maps.host_variables(result.state)
    if jax.process_index() == 0:
      images = eval_images(config, config.num_visualize)
      png = hetero_maps.save_student_maps(
        images,
        model,
        state,
        workdir / "spark_reconstructions.png",
        mask_ratio=float(config.mask_ratio),
        seed=config.seed,
      )
      log.info("wrote %s", png)
  return {
    "stage": STAGE,
    "workdir": str(workdir),
    "steps": task.total_steps,
    "final_loss": result.metrics.get("loss"),
    "train_seconds": result.metrics.get("train_seconds"),
  }
