"""Heterogeneous (H-GKD-style) distillation: a frozen MIM ViT teacher into a
sparse CNN student, on the shared loop.

H-GKD (arXiv 2309.09571) distils a MIM Transformer into a UNet-style CNN
trained with sparse convolution on masked images and published no code; the
sparse part here is SparK's exactly (`stages/spark_pretrain.py`), the
teacher-matching part is OUR design (`models/hetero.py`,
`objectives/hetero_loss.py`):
  * the teacher (stage 2's truncated forward, `stages/distill.py`: loaded
    from a stage-1/2 workdir or an official / timm ViT `.pth`, blocks after
    `teacher.block` never loaded nor run, eval mode, frozen, in `Task.inputs`)
    sees the whole crop and gives its patch tokens after that block;
  * the student sees the same crop, SparK-masked (a mask per example from the
    step key); its decoder map at the teacher's patch stride, through a 1x1
    projection, regresses the whitened teacher tokens on the masked, the
    visible or all positions (smooth-L1 or MSE), plus `pixel_weight` times
    SparK's pixel loss when it is > 0;
  * the teacher's patch grid lines up with the student's stride-32 mask grid
    (same image size, patch size dividing 32), else a config error.

Reads top to bottom: 1. `validate`, 2. teacher and student, 3. `build_task`,
4. `run` (data, loop, `hetero_maps.png`, summary).
"""

from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from mimdistill import workdir as workdir_lib
from mimdistill.data.transforms import normalize
from mimdistill.models import factory, sparse, variants
from mimdistill.models.hetero import HeteroStudent, decoder_blocks_for
from mimdistill.objectives import hetero_loss
from mimdistill.objectives.spark_loss import spark_loss
from mimdistill.paths import as_path
from mimdistill.stages import distill, spark_pretrain
from mimdistill.stages.cnn_sources import check_vit_source
from mimdistill.stages.sources import check_recorded_architecture
from mimdistill.stages.synthetic import Synthetic
from mimdistill.training import cnn_optimizer, run_config
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib

log = logging.getLogger("mimdistill")
STAGE = "hetero_distill"


# -----------------------------------------------------------------------------
# 1. Validation
# -----------------------------------------------------------------------------
def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  """Every check that can fail before data is read or anything compiles
  (`data=False`: all but the teacher source and the dataset)."""
  source = config.teacher.source
  if data and source:
    check_vit_source(source, "teacher.source")
    check_recorded_architecture(config.teacher, source, "teacher")
  grid = spark_pretrain.check_student(config)
  teacher = variants.resolve(config.teacher, "teacher")
  if teacher.image_size != config.data.image_size:
    raise ValueError(
      f"teacher.image_size={teacher.image_size} differs from data.image_size="
      f"{config.data.image_size}: the teacher sees the student's crop unmasked and its patch "
      "grid must line up with the student's mask grid; set both alike"
    )
  try:
    decoder_blocks_for(teacher.patch_size)
  except ValueError as e:
    raise ValueError(
      f"teacher.patch_size={teacher.patch_size}: its {teacher.grid_size}x{teacher.grid_size} "
      f"patch grid does not line up with the student's {grid}x{grid} mask grid (stride "
      f"{sparse.DOWNSAMPLE_RATIO}); {str(e).split('; ')[-1]}"
    ) from None
  block = distill.teacher_block(config)
  if not 1 <= block <= teacher.depth:
    raise ValueError(
      f"teacher.block={block} is beyond the teacher's depth {teacher.depth}; use 1..{teacher.depth}"
      " (1-based, 0 = default: 18 for a depth-24 teacher, else the last)"
    )
  if config.teacher.scan_blocks:
    raise ValueError("teacher.scan_blocks is not supported by hetero_distill; set it to False")
  h = config.hetero
  if h.positions not in hetero_loss.POSITIONS:
    raise ValueError(f"hetero.positions={h.positions!r} is not one of {hetero_loss.POSITIONS}")
  if h.loss not in hetero_loss.LOSSES:
    raise ValueError(f"hetero.loss={h.loss!r} is not one of {hetero_loss.LOSSES}")
  for field in ("beta", "pixel_weight"):
    value = h[field]
    if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):  # NaN fails
      raise ValueError(f"hetero.{field}={value!r} must be a finite number >= 0")
  if not data:
    return
  if not source:
    raise ValueError(
      "teacher.source is empty; set --config.teacher.source= a stage-1/2 workdir (optionally "
      "workdir:step) or an official / timm ViT .pth"
    )
  from mimdistill.data import sources

  sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)


# -----------------------------------------------------------------------------
# 2. Teacher and student
# -----------------------------------------------------------------------------
def build_student(config) -> HeteroStudent:
  teacher = variants.resolve(config.teacher)
  return factory.build(
    "hetero_student",
    config.model,
    teacher_width=teacher.width,
    teacher_patch=teacher.patch_size,
    pixel_loss=bool(config.hetero.pixel_weight),
    dtype=config.dtype,
  )


def teacher_tokens(teacher, variables, images) -> jax.Array:
  """The teacher's patch tokens after its target block `(B, L, D)` (the
  truncated encoder's output without its prefix tokens; the final norm
  only when the target block is the last)."""
  tokens = teacher.apply(variables, images)[:, teacher.num_prefix_tokens :]
  return jax.lax.stop_gradient(tokens)


# -----------------------------------------------------------------------------
# 3. Task
# -----------------------------------------------------------------------------
def build_task(
  config, student: HeteroStudent, teacher, teacher_variables, steps_per_epoch: int
) -> loop_lib.Task:
  total, schedule, weight_decay = spark_pretrain.schedules(config, steps_per_epoch)
  grid = sparse.grid_size(config.data.image_size)
  ratio = float(config.mask_ratio)
  h = config.hetero
  pixel_weight = float(h.pixel_weight)
  dummy = spark_pretrain.dummy_inputs(config)

  def init_variables(rng):
    return student.init({"params": rng}, *dummy)

  def loss_fn(params, model_state, batch, rng, inputs):
    images = normalize(batch["image"])
    mask_rng, drop_rng = jax.random.split(rng)
    active = spark_pretrain.draw_active(mask_rng, images.shape[0], grid, ratio)
    target = teacher_tokens(teacher, inputs, images)
    out, updates = student.apply(
      {"params": params, **model_state},
      images,
      active,
      train=True,
      rngs={"drop_path": drop_rng},
      mutable=["batch_stats"],
    )
    feature = hetero_loss.token_regression_loss(
      out.tokens, target, active, positions=h.positions, loss=h.loss, beta=float(h.beta)
    )
    metrics = {"feature": feature}
    loss = feature
    if pixel_weight:
      metrics["pixel"] = spark_loss(out.spark.rec, images, active).loss
      loss = loss + pixel_weight * metrics["pixel"]
    return loss, (metrics, {**model_state, **updates})

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
    inputs=teacher_variables,
    signature={
      "stage": STAGE,
      "model": spark_pretrain.student_signature(config),
      "teacher": variants.resolve(config.teacher).kwargs(),
      "teacher_block": distill.teacher_block(config),
      "hetero": h.to_dict(),
      "mask_ratio": ratio,
    },
  )


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The task with the configured teacher when its source exists (else a
  random one: speed does not depend on the weights) on a random batch."""
  validate(config, data=False)
  notes = []
  source = config.teacher.source
  if source and ("://" in source or workdir_lib.parse_source(source)[0].exists()):
    check_vit_source(source, "teacher.source")
    teacher, teacher_vars, _ = distill.load_teacher(config)
  else:
    teacher, teacher_vars = distill.random_teacher(config)
    notes.append("teacher: random init; speed does not depend on the weights")
  task = build_task(config, build_student(config), teacher, teacher_vars, steps_per_epoch)
  spec = variants.resolve(config.teacher)
  info = {
    "image_size": config.data.image_size,
    "fused_attention": False,
    "teacher_fused_attention": bool(config.teacher.fused_attention),
    "remat": False,
    "scan_blocks": False,
    "model": f"teacher ViT w{spec.width} d{spec.depth} p{spec.patch_size} (runs "
    f"{distill.teacher_block(config)}) -> CNN {spark_pretrain.student_signature(config)}",
  }
  batch = spark_pretrain.random_batch(config, np.random.default_rng(config.seed))
  return Synthetic(STAGE, task, batch, info, notes)


# -----------------------------------------------------------------------------
# 4. Run
# -----------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
  """Runs (or resumes) the distillation in `workdir`; returns a summary."""
  validate(config)
  teacher, teacher_variables, parent = distill.load_teacher(config)
  student = build_student(config)
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = spark_pretrain.pretrain_data(config, mesh)
  task = build_task(config, student, teacher, teacher_variables, train_data.steps_per_epoch)
  record = {"stage": STAGE, "parent": parent}
  record.update(lineage or {})
  result = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=record,
  )
  if config.num_visualize:
    from mimdistill.visualize import hetero_maps

    state = hetero_maps.host_variables(result.state)
    if jax.process_index() == 0:
      images = spark_pretrain.eval_images(config, config.num_visualize)
      png = hetero_maps.save_student_maps(
        images,
        student,
        state,
        workdir / "hetero_maps.png",
        mask_ratio=float(config.mask_ratio),
        seed=config.seed,
        teacher=teacher,
        teacher_variables=teacher_variables,
        loss=config.hetero.loss,
        beta=float(config.hetero.beta),
      )
      log.info("wrote %s", png)
  return {
    "stage": STAGE,
    "workdir": str(workdir),
    "steps": task.total_steps,
    "teacher": parent.get("path") or parent.get("source"),
    "teacher_step": parent.get("step"),
    "final_loss": result.metrics.get("loss"),
    "train_seconds": result.metrics.get("train_seconds"),
  }
