"""CAE v2 pre-training (Atten4Vis/CAE `tools/run_pretraining.py` with
`--model_type caev2`, `furnace/engine_for_pretraining.py`): a ViT student
(`models.cae.CAEv2`) aligned with a frozen teacher's latents on visible and
masked patches (`objectives.cae_loss`).

A stage of its own rather than a target of the distill stage: the student is
another model (CAE's encoder, regressor and head, not `DistillStudent`), the
masks are drawn in the input pipeline, the schedule is BEiT's table with an
absolute lr, and the teacher may be a CLIP tower; as a distill target each of
those would be a branch in `distill.py`. What the two share is reused, not
copied: the ViT teacher's loading, shape check, truncation and compute-dtype
cast (`distill.load_teacher`), the source records (`stages.sources`).

Reads top to bottom:
  1. `validate`: every check that needs no weights and no data (with
     `data=True` also the teacher file's or workdir's record): the masked
     count, the teacher type, the token grids of teacher and student;
  2. the teacher: `load_teacher` reads a CLIP tower (`interop.clip_names`,
     nothing in the file is run) or a ViT teacher (`distill.load_teacher`),
     as numpy in the compute dtype;
  3. the student through the model factory (`factory.build('cae_v2', ...)`),
     its head as wide as the teacher's tokens;
  4. `build_task`: the loss on the pipeline's block masks, AdamW with the
     official groups (no decay for 1-D params only: `cls_token` and
     `mask_token` ARE decayed; the unused `regresser/norm` frozen), the BEiT
     cosine table (warmup ends on the peak) to `min_lr`;
  5. `run`: data (augment 'cae': jitter, flip, crop, block mask), the shared
     loop, the summary.

The teacher's variables are the loop's `inputs`: sharded like params, passed
to every step, differentiated never (`stop_gradient`), never in the optimizer
state nor in a checkpoint; `lineage.json` records where they came from.

Choices where the official code is silent: a ViT teacher's tokens are those
after its final norm (or at `teacher.block`, TinyMIM's block 18 of 24 by
default), in the student's ImageNet normalisation; `mask.num_patches=0`
scales the official per-size count by area to another patch grid.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mimdistill.data import input_pipeline, sources
from mimdistill.data.block_masking import BlockMaskGenerator, masked_patches_for
from mimdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from mimdistill.interop import clip_names
from mimdistill.interop.torchscript_reader import read_torch_file
from mimdistill.models import factory, variants
from mimdistill.models.cae import NO_GRAD_PARAMS, CAEv2, init_variables
from mimdistill.models.clip import (
  ACTIVATIONS,
  CLIP_MEAN,
  CLIP_STD,
  resize_positional_embedding,
)
from mimdistill.models.vit import QKV_BIAS, stack_blocks
from mimdistill.objectives import cae_loss
from mimdistill.paths import as_path
from mimdistill.stages import distill
from mimdistill.stages.sources import PTH_SUFFIXES, check_recorded_architecture
from mimdistill.stages.synthetic import Synthetic, random_images
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib

log = logging.getLogger("mimdistill")
PyTree = Any
TEACHER_TYPES = ("auto", "clip", "vit")


# -----------------------------------------------------------------------------
# 1. What the config asks for
# -----------------------------------------------------------------------------
def num_masked(config) -> int:
  """`mask.num_patches`, or 0: the official count of `model.variant`."""
  spec = variants.resolve(config.model)
  if config.mask.num_patches:
    return int(config.mask.num_patches)
  variant = config.model.variant
  if variant not in ("tiny", "small", "base"):
    raise ValueError(
      f"mask.num_patches=0 takes the official CAE v2 count of model.variant, and "
      f"{variant!r} has none (tiny / small / base: 30 / 49 / 98 of 196); set "
      "--config.mask.num_patches"
    )
  return masked_patches_for(variant, (spec.grid_size, spec.grid_size))


def mask_generator(config) -> BlockMaskGenerator:
  m = config.mask
  grid = variants.resolve(config.model).grid_size
  return BlockMaskGenerator(
    grid, num_masked(config), m.min_patches_per_block, m.max_patches_per_block, m.min_aspect
  )


def _is_file(source: str) -> bool:
  return str(source).endswith(PTH_SUFFIXES)


def _layout(names) -> str | None:
  """'clip' | 'vit' from a checkpoint's tensor names (None: neither)."""
  names = list(names)
  if any(n.startswith("visual.") for n in names) or "conv1.weight" in names:
    return "clip"
  if "patch_embed.proj.weight" in names or any(n.startswith("blocks.0.") for n in names):
    return "vit"
  return None


def teacher_type(config, tensors=None) -> str:
  """'clip' or 'vit' for `teacher.source`: a workdir is a ViT; a file is
  told apart by its names (read lazily, nothing in it is run)."""
  t = config.teacher
  source = t.source
  if not _is_file(source):
    if t.type == "clip":
      raise ValueError(
        f"teacher.type='clip' but teacher.source={source} is not a .pt/.pth file: a mimdistill "
        "workdir holds a ViT; use teacher.type='vit' (or 'auto'), or point at a CLIP file"
      )
    return "vit"
  if tensors is None:
    if not os.path.isfile(source):
      raise FileNotFoundError(
        f"teacher.source={source} does not exist; point it at a CLIP .pt/.pth file (e.g. "
        "OpenAI's ViT-B-16.pt), an official MAE / TinyMIM .pth or a mimdistill workdir"
      )
    tensors = read_torch_file(source).tensors
  found = _layout(tensors)
  if found is None:
    shown = ", ".join(sorted(tensors)[:5])
    raise ValueError(
      f"teacher.source={source}: unknown teacher layout ({len(tensors)} tensors: {shown}...); "
      "CAE v2 takes a CLIP image tower (visual.* or conv1.*: OpenAI .pt, open_clip, a state "
      "dict), a ViT checkpoint (patch_embed.*, blocks.*) or a mimdistill workdir"
    )
  if t.type != "auto" and t.type != found:
    raise ValueError(
      f"teacher.type={t.type!r} but teacher.source={source} holds a {found} "
      f"({', '.join(sorted(tensors)[:3])}...); set --config.teacher.type={found} or 'auto'"
    )
  return found


def declared_type(config) -> str:
  """The teacher type without reading the source: `teacher.type`, or for
  'auto' what the source's form suggests (a file: CLIP, else a workdir)."""
  t = config.teacher
  if t.type != "auto":
    return t.type
  return "clip" if _is_file(t.source) else "vit"


def teacher_heads(config) -> int:
  """The teacher's attention heads: `teacher.num_heads` (a named variant's;
  a CLIP file fills a 'custom' section with OpenAI's width // 64)."""
  return variants.resolve(_arch_only(config.teacher)).num_heads


def check_token_grid(student: variants.EncoderSpec, patch: int, image: int, what: str) -> None:
  """One token per student patch: the teacher's grid must be the student's."""
  grid = image // patch
  if grid != student.grid_size or image % patch:
    raise ValueError(
      f"the teacher ({what}: patch {patch} at {image}px) gives a {grid}x{grid} token grid but "
      f"the student (model.patch_size={student.patch_size} at {student.image_size}px) a "
      f"{student.grid_size}x{student.grid_size} one: CAE v2 aligns token by token; set "
      f"--config.model.patch_size={patch} (or a teacher with patch {student.patch_size})"
    )


def _check_clip_spec(config, spec: clip_names.ClipVisualSpec) -> None:
  """Fills a 'custom' teacher section's unset fields from a CLIP file and
  refuses a section that disagrees with it."""
  t = config.teacher
  record = dict(width=spec.width, depth=spec.layers, patch_size=spec.patch_size)
  if t.variant == "custom":
    for field, value in record.items():
      if t.get(field) is None:
        t[field] = value
    if t.get("num_heads") is None:
      t.num_heads = spec.heads
  resolved = variants.resolve(_arch_only(t)).kwargs()
  wrong = {f: (resolved[f], v) for f, v in record.items() if resolved[f] != v}
  if t.output_dim and t.output_dim != spec.output_dim:
    wrong["output_dim"] = (t.output_dim, spec.output_dim)
  if wrong:
    shown = ", ".join(f"teacher.{f}={a} but {b} in the file" for f, (a, b) in wrong.items())
    fix = " ".join(f"--config.teacher.{f}={b}" for f, (_, b) in wrong.items())
    raise ValueError(f"teacher.source={t.source}: {shown}; set {fix}")


def _arch_only(section) -> dict:
  keys = ("variant", "width", "depth", "num_heads", "patch_size", "image_size", "mlp_ratio")
  return {k: section[k] for k in keys if k in section}


def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  """Every check that can fail before the teacher's weights or the data are
  read and before anything compiles (`data=False`: all but the teacher
  source and the dataset)."""
  student = variants.resolve(config.model)
  factory.compute_dtype(config.dtype)
  run_config.validate(config)
  t = config.teacher
  if t.type not in TEACHER_TYPES:
    raise ValueError(
      f"teacher.type={t.type!r} is not a known teacher layout; use one of {TEACHER_TYPES}"
    )
  n = num_masked(config)
  if not 0 < n < student.num_patches:
    raise ValueError(
      f"mask.num_patches={n} must be below the {student.num_patches} patches of the student's "
      f"{student.grid_size}x{student.grid_size} grid (CAE v2 needs a visible patch to regress "
      f"from); use 1..{student.num_patches - 1}"
    )
  if config.mask.min_patches_per_block < 1 or not 0 < config.mask.min_aspect <= 1:
    raise ValueError(
      f"mask.min_patches_per_block={config.mask.min_patches_per_block} must be >= 1 and "
      f"mask.min_aspect={config.mask.min_aspect} in (0, 1]"
    )
  mask_generator(config)
  for who, size in (("model", student.image_size), ("teacher", t.image_size)):
    if size != config.data.image_size:
      raise ValueError(
        f"{who}.image_size={size} differs from data.image_size={config.data.image_size}; "
        "teacher and student see the same crop: set all three alike"
      )
  if t.act not in ACTIVATIONS:
    raise ValueError(f"teacher.act={t.act!r} is not one of {ACTIVATIONS} (CLIP's own: quick_gelu)")
  for name, bias in (("model.qkv_bias", config.model.qkv_bias), ("teacher.qkv_bias", t.qkv_bias)):
    if bias is not None and bias not in QKV_BIAS:  # the modules check it only when first run
      raise ValueError(f"{name}={bias!r} is not one of {QKV_BIAS}")
  weight = config.loss_weight
  if not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
    raise ValueError(f"loss_weight={weight!r} must be a finite number > 0 (CAE v2: 1.0)")
  # Layer scale is the gammas' initial value and 0 means none: a negative one
  # would silently build no gammas (`> 0` gates them).
  for name, scale in (
    ("model.layer_scale", config.model.layer_scale),
    ("model.regressor.layer_scale", config.model.regressor.layer_scale),
  ):
    if scale is not None and not (isinstance(scale, (int, float)) and 0 <= scale < float("inf")):
      raise ValueError(f"{name}={scale!r} must be a finite number >= 0 (0: no gammas; CAE v2: 0.1)")
  if not isinstance(t.output_dim, int) or t.output_dim < 0:
    raise ValueError(
      f"teacher.output_dim={t.output_dim!r} must be an integer >= 0 (0: the teacher's width)"
    )
  reg = config.model.regressor
  if reg.width < 1 or reg.depth < 1 or reg.num_heads < 1 or reg.width < reg.num_heads:
    raise ValueError(
      f"model.regressor width={reg.width} depth={reg.depth} num_heads={reg.num_heads}: all must "
      "be >= 1 and the width at least the heads"
    )
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))
  kind = declared_type(config)
  if data:
    if not t.source:
      raise ValueError(
        "teacher.source is empty; set --config.teacher.source= a CLIP .pt/.pth file, a "
        "stage-1/stage-2 workdir (optionally workdir:step) or an official ViT .pth"
      )
    tensors = read_torch_file(t.source).tensors if os.path.isfile(t.source) else None
    kind = teacher_type(config, tensors)
    if kind == "clip":
      _, visual, _ = clip_names.split_visual(tensors, what=t.source)
      clip_names.check_supported(visual, what=t.source)
      spec = clip_names.infer_spec(visual)
      _check_clip_spec(config, spec)
      check_token_grid(student, spec.patch_size, config.data.image_size, f"CLIP {t.source}")
    else:
      check_recorded_architecture(t, t.source, "teacher")
  if kind == "clip" and not data and t.variant == "custom" and t.width is None:
    pass  # the CLIP file fills the section when it is read
  else:
    teacher = variants.resolve(_arch_only(t))
    check_token_grid(student, teacher.patch_size, config.data.image_size, "teacher.*")
  if kind == "clip" and t.block:
    # only a ViT teacher is cut at a block: a CLIP teacher's targets are its
    # projected output tokens, so the field would be ignored
    raise ValueError(
      f"teacher.block={t.block!r} picks a ViT teacher's block; a CLIP teacher's targets are its "
      "projected output tokens: set --config.teacher.block=0"
    )
  if kind == "vit":
    block = distill.teacher_block(config)
    if not 1 <= block <= teacher.depth:
      raise ValueError(
        f"teacher.block={block} is beyond the teacher's depth {teacher.depth}; use a block in "
        f"1..{teacher.depth} (1-based, 0 = the last)"
      )
  if data:
    sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)


# -----------------------------------------------------------------------------
# 2. The teacher
# -----------------------------------------------------------------------------
def _unscanned(config):
  """The config with `teacher.scan_blocks` off: `distill.load_teacher`
  stacks for its own targets, the CAE teacher runs every block it keeps."""
  plain = copy.deepcopy(config)
  plain.teacher.scan_blocks = False
  return plain


def _vit(config, variables: dict):
  """(teacher_fn, variables, token width) of a pruned ViT teacher."""
  module = distill.build_teacher(config)
  if config.teacher.scan_blocks:
    variables = dict(variables, params=stack_blocks(variables["params"], module.depth))
  return cae_loss.vit_teacher(module), variables, module.width


def _clip_module(config, spec: clip_names.ClipVisualSpec):
  t = config.teacher
  kwargs = spec.module_kwargs(
    image_size=config.data.image_size, heads=teacher_heads(config), act=t.act
  )
  return factory.build("clip_visual", kwargs, dtype=config.dtype)


def load_teacher(config) -> tuple[cae_loss.TeacherFn, dict, int, dict]:
  """(teacher_fn, variables as numpy in the compute dtype, token width,
  lineage record of the source)."""
  t = config.teacher
  if teacher_type(config) == "vit":
    _, variables, record = distill.load_teacher(_unscanned(config))
    fn, variables, width = _vit(config, variables)
    return fn, variables, width, dict(record, teacher_type="vit")
  ckpt = read_torch_file(t.source)
  params, spec, report, layout = clip_names.clip_visual_to_flax(ckpt.tensors, what=t.source)
  _check_clip_spec(config, spec)
  student = variants.resolve(config.model)
  check_token_grid(student, spec.patch_size, config.data.image_size, f"CLIP {t.source}")
  grid = config.data.image_size // spec.patch_size
  if grid != spec.grid_size:
    # clip.modeling_clip.load(..., image_resolution=second_input_size)
    log.info("teacher: CLIP position embedding %d -> %d grid", spec.grid_size, grid)
    params["positional_embedding"] = resize_positional_embedding(
      params["positional_embedding"], grid
    )
  dtype = np.dtype(factory.compute_dtype(config.dtype))
  variables = {"params": jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), params)}
  module = _clip_module(config, spec)
  record = {
    "kind": "clip",
    "teacher_type": "clip",
    "path": os.path.abspath(t.source),
    "layout": layout,
    "model": {**spec.module_kwargs(), "heads": module.heads, "image_size": module.image_size},
    "skipped": len(report.skipped),
  }
  return cae_loss.clip_teacher(module), variables, spec.output_dim, record


def random_teacher(config) -> tuple[cae_loss.TeacherFn, dict, int]:
  """A random teacher of the configured architecture (numpy, on the host):
  speed does not depend on the weights."""
  t = config.teacher
  if declared_type(config) == "vit":
    _, variables = distill.random_teacher(_unscanned(config))
    return _vit(config, variables)
  spec = variants.resolve(_arch_only(t))
  out = int(t.output_dim or spec.width)
  clip = clip_names.ClipVisualSpec(
    spec.width, spec.depth, spec.num_heads, spec.patch_size, spec.image_size, out, spec.mlp_ratio
  )
  module = _clip_module(config, clip)
  abstract = jax.eval_shape(
    module.init, jax.random.PRNGKey(0), np.zeros((1, spec.image_size, spec.image_size, 3))
  )
  rng = np.random.default_rng(config.seed + 1)
  dtype = np.dtype(factory.compute_dtype(config.dtype))
  variables = jax.tree_util.tree_map_with_path(
    lambda path, a: (
      float("scale" in jax.tree_util.keystr(path)) + 0.05 * rng.standard_normal(a.shape)
    ).astype(dtype),
    abstract,
  )
  return cae_loss.clip_teacher(module), variables, out


def teacher_norm(kind: str):
  """The teacher's input normalisation: CLIP's, or the student's ImageNet one."""
  return (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


# -----------------------------------------------------------------------------
# 3. The student
# -----------------------------------------------------------------------------
def build_student(config, out_dim: int) -> CAEv2:
  return factory.build("cae_v2", config.model, dtype=config.dtype, out_dim=out_dim)


# -----------------------------------------------------------------------------
# 4. The task for the shared loop
# -----------------------------------------------------------------------------
def build_task(
  config,
  student: CAEv2,
  teacher_fn: cae_loss.TeacherFn,
  teacher_variables: dict,
  kind: str,
  steps_per_epoch: int,
) -> loop_lib.Task:
  spec = variants.resolve(config.model)
  total, warmup = run_config.steps(config, steps_per_epoch)
  # utils.cosine_scheduler: np.linspace warmup ending ON the peak, then cosine.
  table = schedules.beit_cosine_values(
    run_config.peak_lr(config), config.min_lr, 1, total, warmup_steps=warmup
  )
  schedule = schedules.from_values(table)
  masked = num_masked(config)
  objective = cae_loss.make_loss_fn(
    student,
    teacher_fn,
    num_masked=masked,
    teacher_norm=teacher_norm(kind),
    weight=float(config.loss_weight),
  )

  def loss_fn(params, model_state, batch, rng, inputs):
    view = {"images": normalize(batch["image"]), "mask": batch["patch_mask"]}
    loss, metrics = objective(params, view, rng, inputs, model_state["fixed"])
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    return loss, (metrics, model_state)

  return loop_lib.Task(
    name="cae",
    init_variables=lambda rng: init_variables(student, rng),
    loss_fn=loss_fn,
    make_optimizer=lambda params, sched: opt_lib.from_config(
      params, sched, config.optimizer, frozen=NO_GRAD_PARAMS
    ),
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    accumulate_steps=config.optimizer.accumulate_steps,
    inputs=teacher_variables,
    signature={
      "stage": "cae",
      "model": spec.kwargs(),
      "encoder": {
        "layer_scale": config.model.layer_scale,
        "qkv_bias": config.model.qkv_bias,
      },
      "regressor": config.model.regressor.to_dict(),
      "out_dim": student.out_dim,
      "teacher_type": kind,
      "num_masked": masked,
    },
  )


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The task with the configured teacher when its source exists (else a
  random one) and a random batch with block masks."""
  validate(config, data=False)
  notes = []
  source = config.teacher.source
  if source and (os.path.exists(source) or "://" in source):
    teacher_fn, teacher_vars, width, _ = load_teacher(config)
    kind, teacher_from = teacher_type(config), source
  else:
    teacher_fn, teacher_vars, width = random_teacher(config)
    kind = declared_type(config)
    teacher_from = "random init"
    notes.append(
      f"teacher: random init (teacher.source {source!r} does not exist); speed does not "
      "depend on the weights"
    )
  student = build_student(config, width)
  task = build_task(config, student, teacher_fn, teacher_vars, kind, steps_per_epoch)
  spec = variants.resolve(config.model)
  rng = np.random.default_rng(config.seed)
  batch = {
    "image": random_images(config.batch_size, spec, rng),
    "patch_mask": mask_generator(config).batch(rng, config.batch_size),
    "label": np.zeros((config.batch_size,), np.int32),
  }
  reg = config.model.regressor
  info = {
    "image_size": spec.image_size,
    "fused_attention": bool(config.model.fused_attention),
    "remat": bool(config.model.remat),
    "scan_blocks": bool(config.model.scan_blocks),
    "teacher": teacher_from,
    "model": f"CAE v2 w{spec.width} d{spec.depth} h{spec.num_heads} p{spec.patch_size} + "
    f"regressor w{reg.width} d{reg.depth}, {num_masked(config)}/{spec.num_patches} masked, "
    f"{kind} teacher -> {width}",
  }
  return Synthetic("cae", task, batch, info, notes)


# -----------------------------------------------------------------------------
# 5. Run
# -----------------------------------------------------------------------------
def data_config(config) -> ml_collections.ConfigDict:
  """The pipeline's config: the data section plus the block mask's fields."""
  cfg = run_config.data_config(config, "cae")
  m = config.mask
  cfg.update(
    mask_grid=variants.resolve(config.model).grid_size,
    num_masked=num_masked(config),
    mask_min_patches=m.min_patches_per_block,
    mask_max_patches=m.max_patches_per_block,
    mask_min_aspect=m.min_aspect,
  )
  return cfg


def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
  """Runs (or resumes) CAE v2 pre-training in `workdir`; returns a summary."""
  validate(config)
  teacher_fn, teacher_variables, width, parent = load_teacher(config)
  student = build_student(config, width)
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = input_pipeline.make_dataset(
    data_config(config),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  kind = parent["teacher_type"]
  task = build_task(
    config, student, teacher_fn, teacher_variables, kind, train_data.steps_per_epoch
  )
  record = {"stage": "cae", "parent": parent}
  record.update(lineage or {})
  first: dict = {}

  def on_log(step, metrics):
    if not first:
      first.update(step=step, loss=metrics["loss"])

  result = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=record,
    on_log=on_log,
  )
  return {
    "stage": "cae",
    "workdir": str(workdir),
    "steps": task.total_steps,
    "teacher": parent.get("path") or parent.get("source"),
    "teacher_type": kind,
    "num_masked": num_masked(config),
    "first_logged": first,
    "final_loss": result.metrics.get("loss"),
    "train_seconds": result.metrics.get("train_seconds"),
  }
