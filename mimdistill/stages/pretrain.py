"""Stage 1: MAE pre-training. Picks model, objective and data, then calls the
shared loop; at the end writes a reconstruction grid for a few eval images."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimdistill.data import input_pipeline, sources
from mimdistill.data.transforms import normalize
from mimdistill.models import factory, variants
from mimdistill.models.mae import MAE, check_mask_ratio
from mimdistill.objectives.mae_loss import mae_loss
from mimdistill.paths import as_path
from mimdistill.stages.synthetic import Synthetic, random_images
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib

log = logging.getLogger("mimdistill")


def build_model(config: ml_collections.ConfigDict) -> MAE:
  return factory.build("mae", config.model, dtype=config.dtype)


def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  """Every check that can fail before data is read or anything compiles
  (`data=False`: all but the dataset's availability)."""
  spec = variants.resolve(config.model)
  factory.compute_dtype(config.dtype)
  run_config.validate(config)
  check_mask_ratio(config.mask_ratio, spec.num_patches, "mask_ratio")
  dec = config.model.decoder
  sizes = (dec.width, dec.depth, dec.num_heads)
  if not all(isinstance(v, int) and v >= 1 for v in sizes) or dec.width % dec.num_heads:
    raise ValueError(
      f"model.decoder width={dec.width} depth={dec.depth} num_heads={dec.num_heads}: all must be "
      "integers >= 1 and the heads must divide the width (MAE: 512, 8, 16)"
    )
  if dec.width % 4:
    raise ValueError(
      f"model.decoder.width={dec.width} must be a multiple of 4 for the 2-D sin-cos position "
      "embedding"
    )
  if config.model.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={config.model.image_size} differs from "
      f"data.image_size={config.data.image_size}; set both alike"
    )
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))
  if data:
    sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)


def build_task(config, model: MAE, steps_per_epoch: int) -> loop_lib.Task:
  spec = variants.resolve(config.model)
  total, warmup = run_config.steps(config, steps_per_epoch)
  schedule = schedules.warmup_cosine(run_config.peak_lr(config), config.min_lr, total, warmup)
  dummy = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_chans))
  noise_shape = (spec.num_patches,)

  def init_variables(rng):
    return model.init({"params": rng}, dummy, jnp.zeros((1, *noise_shape)), config.mask_ratio)

  def loss_fn(params, model_state, batch, rng, inputs):
    images = normalize(batch["image"])
    mask_rng, drop_rng = jax.random.split(rng)
    noise = jax.random.uniform(mask_rng, (images.shape[0], *noise_shape))
    out = model.apply(
      {"params": params, **model_state},
      images,
      noise,
      config.mask_ratio,
      train=True,
      rngs={"drop_path": drop_rng},
    )
    loss = mae_loss(out.pred, images, out.masking.mask, spec.patch_size, config.norm_pix_loss)
    return loss, ({}, model_state)

  return loop_lib.Task(
    name="pretrain",
    init_variables=init_variables,
    loss_fn=loss_fn,
    make_optimizer=lambda params, sched: opt_lib.from_config(params, sched, config.optimizer),
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    accumulate_steps=config.optimizer.accumulate_steps,
    signature={
      "stage": "pretrain",
      "model": spec.kwargs(),
      "decoder": config.model.decoder.to_dict(),
    },
  )


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The stage's task and one batch of random data of the right shapes, with
  no data or checkpoint read (for the benchmark and the scale tests)."""
  validate(config, data=False)
  task = build_task(config, build_model(config), steps_per_epoch)
  spec = variants.resolve(config.model)
  rng = np.random.default_rng(config.seed)
  batch = {
    "image": random_images(config.batch_size, spec, rng),
    "label": np.zeros((config.batch_size,), np.int32),
  }
  model = config.model
  info = {
    "image_size": spec.image_size,
    "fused_attention": bool(model.fused_attention),
    "remat": bool(model.remat),
    "scan_blocks": bool(model.scan_blocks),
    "model": f"MAE w{spec.width} d{spec.depth} h{spec.num_heads} p{spec.patch_size} + decoder "
    f"w{model.decoder.width} d{model.decoder.depth}",
  }
  return Synthetic("pretrain", task, batch, info, [])


def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
  """Runs (or resumes) stage 1 in `workdir`; returns a summary dict."""
  validate(config)
  workdir = as_path(workdir)
  model = build_model(config)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = input_pipeline.make_dataset(
    run_config.data_config(config, "mae"),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  task = build_task(config, model, train_data.steps_per_epoch)
  result = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=lineage or {"stage": "pretrain", "parent": None},
  )
  if config.num_visualize and jax.process_index() == 0:
    from mimdistill.visualize.reconstructions import save_reconstructions

    count = config.num_visualize
    n = jax.device_count()
    eval_data = input_pipeline.make_dataset(
      run_config.data_config(config, "eval", batch_size=-(-count // n) * n),
      split=config.data.eval_split,
      train=False,
      seed=config.seed,
    )
    images = normalize(eval_data.first_batch()["image"][:count])
    state = jax.device_get((result.state.params, result.state.model_state))
    png = save_reconstructions(
      model,
      {"params": state[0], **state[1]},
      images,
      workdir / "reconstructions.png",
      mask_ratio=config.mask_ratio,
      norm_pix_loss=config.norm_pix_loss,
    )
    log.info("wrote %s", png)
  return {
    "stage": "pretrain",
    "workdir": str(workdir),
    "steps": task.total_steps,
    "final_loss": result.metrics.get("loss"),
    "train_seconds": result.metrics.get("train_seconds"),
  }
