"""Stage 2: TinyMIM distillation of a frozen MIM teacher into a small ViT.

Reads top to bottom:
  1. `validate`: every config check that needs no checkpoint and no data;
  2. the teacher: `load_teacher` restores it from a stage-1 (or stage-2)
     workdir or an official `.pth`, checks its shapes against the teacher
     config and keeps only what the target block needs (blocks after the
     target are never loaded, let alone run);
  3. the student (`models.tinymim`): the encoder under params key `encoder`,
     plus the trainable heads some ablation targets need under `heads`;
  4. `build_task`: the loss, the optimizer with the student parameters that
     get no gradient frozen (no update, no weight decay, no state);
  5. `run`: data, the shared loop, the relation-map picture, the summary.

The teacher's variables are the loop's non-trained `inputs`: sharded like
params, passed to every step, differentiated never (its outputs go through
`stop_gradient`), never in the optimizer state nor in a checkpoint;
`lineage.json` records where they came from.

A student with DeiT's distillation token (`student.dist_token`, TinyMIM*-T:
tokens `[cls, dist, patches]`) has one token more than the teacher.
`distill.dist_token` says what the targets do with it (our choice; TinyMIM
never published how its star model was distilled): 'exclude' (default)
drops it from the student's last-block q/k/v (and token features) before
the relations, so both sides relate `[cls, patches]` and the token is
trained through the earlier blocks only, as in any student without it;
'as_cls' keeps it and gives the teacher's CLS q/k/v (and features) to it as
its target, so the relations are over N + 2 tokens on both sides (the
teacher's CLS key then counts twice in its softmax).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimdistill import workdir as workdir_lib
from mimdistill.data import input_pipeline, sources
from mimdistill.data.transforms import normalize
from mimdistill.models import factory, variants
from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models.mae import check_mask_ratio, random_masking
from mimdistill.models.tinymim import DistillStudent
from mimdistill.models.vit import ViTEncoder, stack_blocks
from mimdistill.objectives import distill_targets as targets_lib
from mimdistill.objectives.mae_loss import mae_loss
from mimdistill.objectives.relations import RELATION_SETS
from mimdistill.paths import as_path
from mimdistill.stages.sources import check_recorded_architecture, read_encoder, shape_table
from mimdistill.stages.synthetic import Synthetic, random_images
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib

log = logging.getLogger("mimdistill")
PyTree = Any

# TinyMIM takes ViT-L's relations at block 18 of 24; any other depth uses its
# last block (ViT-B/S: 12 of 12).
DEFAULT_TEACHER_BLOCK = {24: 18}
STUDENT_INPUTS = ("raw", "masked")
DIST_TOKEN_MODES = ("exclude", "as_cls")


# -----------------------------------------------------------------------------
# 1. What the config asks for
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
  """The distillation, resolved from `config.distill` (every field is read
  from the config; the defaults live in configs/tinymim_distill.py)."""

  target: str  # 'relation' | 'cls' | 'feature'
  teacher_block: int  # 1-based
  relation_heads: int  # R
  relation_set: str
  softmax: bool
  raw_loss: str
  feature: str
  beta: float
  masked: bool
  mask_ratio: float
  mae_weight: float
  norm_pix_loss: bool
  dist_token: str = "exclude"  # what the targets do with a student dist token
  student_dist: bool = False  # the student has one

  @property
  def needs_projection(self) -> bool:
    return self.target in ("cls", "feature")


def teacher_block(config) -> int:
  spec = variants.resolve(config.teacher)
  return int(config.teacher.block) or DEFAULT_TEACHER_BLOCK.get(spec.depth, spec.depth)


def relation_heads(config) -> int:
  return int(config.distill.relation_heads) or variants.resolve(config.teacher).num_heads


def make_plan(config) -> Plan:
  d = config.distill
  return Plan(
    target=d.target,
    teacher_block=teacher_block(config),
    relation_heads=relation_heads(config),
    relation_set=d.relation_set,
    softmax=bool(d.softmax),
    raw_loss=d.raw_loss,
    feature=d.feature,
    beta=float(d.beta),
    masked=d.student_input == "masked",
    mask_ratio=float(d.mask_ratio),
    mae_weight=float(d.mae_weight),
    norm_pix_loss=bool(d.norm_pix_loss),
    dist_token=d.dist_token,
    student_dist=bool(config.student.dist_token),
  )


def _divisors_of_both(a: int, b: int) -> list[int]:
  g = math.gcd(a, b)
  return [r for r in range(1, g + 1) if g % r == 0]


def _one_of(value, allowed, field: str) -> None:
  if value not in allowed:
    raise ValueError(f"{field}={value!r} is not one of {sorted(allowed)}")


def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  """Every check that can fail before a checkpoint or data is read
  (`data=False`: all but the teacher source and the dataset). A teacher
  workdir's recorded architecture fills the teacher fields the config leaves
  unset and must agree with the rest."""
  if data and config.teacher.source:
    check_recorded_architecture(config.teacher, config.teacher.source, "teacher")
  student = variants.resolve(config.student, "student")
  teacher = variants.resolve(config.teacher, "teacher")
  factory.compute_dtype(config.dtype)
  run_config.validate(config)
  d = config.distill
  _one_of(d.target, targets_lib.TARGETS, "distill.target")
  _one_of(d.relation_set, RELATION_SETS, "distill.relation_set")
  _one_of(d.raw_loss, targets_lib.RAW_RELATION_LOSSES, "distill.raw_loss")
  _one_of(d.feature, targets_lib.FEATURE_TYPES, "distill.feature")
  _one_of(d.student_input, STUDENT_INPUTS, "distill.student_input")
  _one_of(d.dist_token, DIST_TOKEN_MODES, "distill.dist_token")
  plan = make_plan(config)
  if plan.masked:
    check_mask_ratio(plan.mask_ratio, student.num_patches, "distill.mask_ratio")
  if not isinstance(d.mae_weight, (int, float)) or not 0 <= d.mae_weight < float("inf"):
    raise ValueError(
      f"distill.mae_weight={d.mae_weight!r} must be a finite number >= 0 (0: no MAE loss)"
    )
  if plan.mae_weight and not plan.masked:
    raise ValueError(
      f"distill.mae_weight={plan.mae_weight} needs "
      "distill.student_input='masked' (MAE reconstructs the "
      "removed patches)"
    )
  if not 1 <= plan.teacher_block <= teacher.depth:
    raise ValueError(
      f"teacher.block={plan.teacher_block} is beyond the teacher's depth "
      f"{teacher.depth}; use a block in 1..{teacher.depth} (1-based, 0 = "
      "default: 18 for a depth-24 teacher, else the last)"
    )
  if not isinstance(d.relation_heads, int) or d.relation_heads < 0:
    raise ValueError(
      f"distill.relation_heads={d.relation_heads!r} must be an integer >= 0 (0: the teacher's "
      "heads; TinyMIM uses 12 for ViT-B -> ViT-S)"
    )
  if not isinstance(d.beta, (int, float)) or not 0 <= d.beta < float("inf"):
    # an infinite beta makes the smooth-L1 0.5 x^2 / beta zero: no signal at all
    raise ValueError(
      f"distill.beta={d.beta!r} must be a finite number >= 0 (the feature loss's smooth-L1 "
      "beta; 0 is L1, TinyMIM: 2.0)"
    )
  if plan.mae_weight:
    dec = d.decoder
    if min(dec.width, dec.depth, dec.num_heads) < 1 or dec.width % dec.num_heads:
      raise ValueError(
        f"distill.decoder width={dec.width} depth={dec.depth} num_heads={dec.num_heads}: all "
        "must be >= 1 and the heads must divide the width"
      )
  if plan.target == "relation":
    r = plan.relation_heads
    for who, width in (("teacher", teacher.width), ("student", student.width)):
      if width % r:
        raise ValueError(
          f"distill.relation_heads={r} does not divide the {who} width "
          f"{width}; use one of {_divisors_of_both(teacher.width, student.width)}"
          f" (divisors of both widths {teacher.width} and {student.width})"
        )
  if plan.target != "cls" and student.num_patches != teacher.num_patches:
    raise ValueError(
      f"student image_size/patch_size {student.image_size}/{student.patch_size}"
      f" gives {student.num_patches} patch tokens but the teacher's "
      f"{teacher.image_size}/{teacher.patch_size} gives {teacher.num_patches};"
      " relations and features need the same tokens: set student.patch_size="
      f"{teacher.patch_size} and student.image_size={teacher.image_size}"
    )
  for who, spec in (("student", student), ("teacher", teacher)):
    if spec.image_size != config.data.image_size:
      raise ValueError(
        f"{who}.image_size={spec.image_size} differs from data.image_size="
        f"{config.data.image_size}; teacher and student see the same crop: "
        "set all three alike"
      )
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))
  if not data:
    return
  if not config.teacher.source:
    raise ValueError(
      "teacher.source is empty; set --config.teacher.source= a "
      "stage-1/stage-2 workdir (optionally workdir:step) or an "
      "official .pth file"
    )
  sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)


# -----------------------------------------------------------------------------
# 2. The teacher
# -----------------------------------------------------------------------------
def build_teacher(config, depth: int | None = None) -> ViTEncoder:
  """The teacher encoder truncated after the target block (`depth` overrides
  the truncation: the full teacher is only built to check shapes). The final
  norm exists only when the target block is the teacher's last."""
  spec = variants.resolve(config.teacher)
  depth = depth or teacher_block(config)
  return factory.build(
    "encoder", config.teacher, dtype=config.dtype, depth=depth, final_norm=depth == spec.depth
  )


def _abstract_variables(model: ViTEncoder) -> dict:
  dummy = jnp.zeros((1, model.image_size, model.image_size, model.in_chans))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)


def _natural(name: str):
  """Sort key: blocks_2 before blocks_10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _describe(spec: variants.EncoderSpec) -> str:
  return (
    f"width={spec.width} depth={spec.depth} num_heads={spec.num_heads} "
    f"patch_size={spec.patch_size} image_size={spec.image_size}"
  )


def _source_hint(source: str) -> str:
  """What a workdir's config.json says its model is, for error messages."""
  workdir, _ = workdir_lib.parse_source(source)
  model = workdir_lib.signature(workdir).get("model") if workdir.is_dir() else None
  if not model:
    return ""
  keys = ("width", "depth", "num_heads", "patch_size", "image_size")
  return " (its config.json says: " + " ".join(f"{k}={model[k]}" for k in keys if k in model) + ")"


def check_teacher_shapes(variables: dict, config, source: str) -> None:
  """Raises, listing every difference, unless `variables` fit the teacher."""
  spec = variants.resolve(config.teacher)
  want = shape_table(_abstract_variables(build_teacher(config, spec.depth)))
  got = shape_table(variables)
  # A module wholly absent on one side (e.g. extra blocks) is one entry.
  module = lambda k: "/".join(k.split("/")[:2])
  want_mods, got_mods = {module(k) for k in want}, {module(k) for k in got}
  diffs = [f"missing {m}" for m in sorted(want_mods - got_mods, key=_natural)]
  diffs += [f"unexpected {m}" for m in sorted(got_mods - want_mods, key=_natural)]
  diffs += [f"missing {k} {want[k]}" for k in want if k not in got and module(k) in got_mods]
  diffs += [f"unexpected {k} {got[k]}" for k in got if k not in want and module(k) in want_mods]
  diffs += [
    f"{k} is {got[k]}, config wants {want[k]}" for k in want if k in got and got[k] != want[k]
  ]
  if diffs:
    shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise ValueError(
      f"teacher checkpoint {source} is of another architecture than the "
      f"teacher config ({_describe(spec)}){_source_hint(source)}: {shown}. "
      "Set --config.teacher.* to the checkpoint's architecture."
    )


def read_teacher_source(source: str) -> tuple[dict, dict]:
  """Full teacher variables `{'params', 'fixed'?}` (numpy) and a lineage record."""
  src = read_encoder(source, what="teacher.source")
  params = dict(src.encoder)
  pos = params.pop("pos_embed", None)  # a .pth's buffer, or a learned one
  variables = {"params": params}
  if src.encoder_fixed is not None:
    variables["fixed"] = src.encoder_fixed
  elif pos is not None:
    variables["fixed"] = {"pos_embed": pos}
  return variables, src.record


def prune_teacher(variables: dict, config) -> dict:
  """Only the leaves the truncated teacher has, as numpy arrays in the
  compute dtype (cast once here, not in every step, and half the memory in
  bfloat16); with `teacher.scan_blocks` the blocks the scan runs are stacked
  once (`vit.stack_blocks`)."""
  template = _abstract_variables(build_teacher(config))
  dtype = np.dtype(factory.compute_dtype(config.dtype))

  def take(tmpl, tree):
    return {
      k: (take(v, tree[k]) if isinstance(v, dict) else np.asarray(tree[k], dtype))
      for k, v in tmpl.items()
    }

  pruned = take(dict(template), dict(variables))
  if config.teacher.scan_blocks:
    pruned["params"] = stack_blocks(pruned["params"], scanned_teacher_blocks(config))
  return pruned


def scanned_teacher_blocks(config) -> int:
  """Blocks of the truncated teacher that its forward runs under the scan:
  all of them for the targets that read its output, those before the
  target block (whose norm1/qkv or branches are read directly) otherwise."""
  plan = make_plan(config)
  whole = plan.target == "cls" or (plan.target == "feature" and plan.feature == "output")
  return plan.teacher_block if whole else plan.teacher_block - 1


def load_teacher(config) -> tuple[ViTEncoder, dict, dict]:
  """(truncated teacher module, its variables, lineage record of the source)."""
  source = config.teacher.source
  variables, record = read_teacher_source(source)
  variables = {k: v for k, v in variables.items() if k in ("params", "fixed")}
  if "fixed" not in variables:
    # A checkpoint without the fixed sin-cos buffer: it is a function of the
    # architecture, so compute it.
    spec = variants.resolve(config.teacher)
    variables["fixed"] = {"pos_embed": pos_embed_lib.sincos_2d(spec.width, spec.grid_size)[None]}
  check_teacher_shapes(variables, config, source)
  record.update(block=teacher_block(config), model=variants.resolve(config.teacher).kwargs())
  return build_teacher(config), prune_teacher(variables, config), record


def random_teacher(config) -> tuple[ViTEncoder, dict]:
  """Random, eval-only teacher variables (numpy, drawn on the host): speed
  does not depend on the weights, and compiling the initialisers would cost
  more than a benchmark or a scale test needs."""
  teacher = build_teacher(config)
  rng = np.random.default_rng(config.seed + 1)
  abstract = _abstract_variables(teacher)
  variables = jax.tree_util.tree_map_with_path(
    lambda path, a: (
      float("scale" in jax.tree_util.keystr(path)) + 0.05 * rng.standard_normal(a.shape)
    ).astype(np.float32),
    abstract,
  )
  return teacher, prune_teacher(variables, config)


def _token_index(ids_keep: jax.Array) -> jax.Array:
  """CLS + visible patch positions `(B, 1 + keep)` in the full token sequence."""
  cls = jnp.zeros((ids_keep.shape[0], 1), ids_keep.dtype)
  return jnp.concatenate([cls, ids_keep + 1], axis=1)


def teacher_outputs(
  teacher: ViTEncoder,
  variables: dict,
  images: jax.Array,
  plan: Plan,
  ids_keep: jax.Array | None = None,
) -> dict:
  """What the target needs from the (truncated, eval-mode) teacher.

  With a masked student input the teacher still sees the whole image; its
  tokens are then restricted to CLS + the student's visible patches, so both
  relations are softmaxes over the same keys.
  """
  out: dict[str, Any] = {}
  keep = None if ids_keep is None else _token_index(ids_keep)
  if plan.target == "relation":
    qkv = teacher.apply(
      variables,
      images,
      block=plan.teacher_block,
      heads=plan.relation_heads,
      method=ViTEncoder.relation_qkv,
    )
    if keep is not None:
      qkv = tuple(jnp.take_along_axis(x, keep[:, None, :, None], axis=2) for x in qkv)
    out["qkv"] = qkv
  elif plan.target == "cls" or plan.feature == "output":
    y = teacher.apply(variables, images)  # every block of the truncated teacher
    if plan.target == "cls":
      out["cls"] = y[:, 0]
    else:
      out["feature"] = y
  else:
    out["feature"] = teacher.apply(
      variables, images, block=plan.teacher_block, method=ViTEncoder.block_features
    )[plan.feature]
  if "feature" in out and keep is not None:
    out["feature"] = jnp.take_along_axis(out["feature"], keep[..., None], axis=1)
  return jax.lax.stop_gradient(out)


# -----------------------------------------------------------------------------
# 3. The student
# -----------------------------------------------------------------------------
def build_student(config) -> DistillStudent:
  plan = make_plan(config)
  teacher = variants.resolve(config.teacher)
  return factory.build(
    "tinymim_student",
    config.student,
    dtype=config.dtype,
    proj_width=teacher.width if plan.needs_projection else 0,
    decoder=config.distill.decoder if plan.mae_weight else None,
  )


def frozen_patterns(plan: Plan, depth: int) -> list[str]:
  """Student params the target never reaches (no gradient): frozen like a
  PyTorch param whose grad is None (no update, no weight decay)."""
  if plan.mae_weight:
    return []  # the decoder reads the full encoder output
  last = f"encoder/blocks_{depth - 1}"
  after_qkv = [f"{last}/attn/proj/.*", f"{last}/norm2/.*", f"{last}/mlp/.*", "encoder/norm/.*"]
  if plan.target == "relation" or (plan.target == "feature" and plan.feature in ("q", "k", "v")):
    return after_qkv
  if plan.target == "feature" and plan.feature in ("attn", "attn_residual"):
    return after_qkv[1:]
  if plan.target == "feature" and plan.feature in ("ffn", "ffn_residual"):
    return ["encoder/norm/.*"]
  return []


def _drop_token_1(x: jax.Array, axis: int) -> jax.Array:
  """`x` without token 1 (the distillation token) along `axis`."""
  keep = jnp.asarray([0, *range(2, x.shape[axis])])
  return jnp.take(x, keep, axis=axis)


def _cls_twice(x: jax.Array, axis: int) -> jax.Array:
  """The teacher's tokens `[cls, cls, patches]` along `axis`: CLS's copy is
  the target of the student's distillation token."""
  keep = jnp.asarray([0, 0, *range(1, x.shape[axis])])
  return jnp.take(x, keep, axis=axis)


def align_dist_token(plan: Plan, t: dict, s: dict) -> tuple[dict, dict]:
  """Teacher and student outputs over the same tokens when the student has a
  distillation token (see the module doc): q/k/v `(B, R, N, d)` on axis 2,
  token features `(B, N, D)` on axis 1; the CLS target needs nothing."""
  if not plan.student_dist:
    return t, s
  t, s = dict(t), dict(s)
  if plan.dist_token == "exclude":
    if "qkv" in s:
      s["qkv"] = tuple(_drop_token_1(x, 2) for x in s["qkv"])
    if "feature" in s:
      s["feature"] = _drop_token_1(s["feature"], 1)
  else:
    if "qkv" in t:
      t["qkv"] = tuple(_cls_twice(x, 2) for x in t["qkv"])
    if "feature" in t:
      t["feature"] = _cls_twice(t["feature"], 1)
  return t, s


# -----------------------------------------------------------------------------
# 4. The task for the shared loop
# -----------------------------------------------------------------------------
def make_loss_fn(plan: Plan, student: DistillStudent, teacher: ViTEncoder):
  num_patches = student.encoder.num_patches
  patch = student.encoder.patch_size

  def loss_fn(params, model_state, batch, rng, inputs):
    t_images = normalize(batch["image"])
    s_images = normalize(batch["image_student"]) if "image_student" in batch else t_images
    mask_rng, drop_rng = jax.random.split(rng)
    ids_keep = ids_restore = mask = None
    if plan.masked:
      noise = jax.random.uniform(mask_rng, (s_images.shape[0], num_patches))
      ids_keep, mask, ids_restore = random_masking(noise, plan.mask_ratio)
    t = teacher_outputs(teacher, inputs, t_images, plan, ids_keep)
    s = student.apply(
      {"params": params, **model_state},
      s_images,
      train=True,
      ids_keep=ids_keep,
      ids_restore=ids_restore,
      relation_heads=plan.relation_heads if plan.target == "relation" else 0,
      feature=plan.feature if plan.target == "feature" else None,
      cls=plan.target == "cls",
      reconstruct=bool(plan.mae_weight),
      rngs={"drop_path": drop_rng},
    )
    t, s = align_dist_token(plan, t, s)
    if plan.target == "relation":
      losses = targets_lib.relation_target_losses(
        t["qkv"],
        s["qkv"],
        relation_set=plan.relation_set,
        softmax=plan.softmax,
        raw_loss=plan.raw_loss,
        beta=plan.beta,
      )
    elif plan.target == "cls":
      losses = {"cls": targets_lib.cls_kl(t["cls"], s["cls"])}
    else:
      losses = {"feature": targets_lib.feature_loss(s["feature"], t["feature"], plan.beta)}
    loss = sum(losses.values())
    if plan.mae_weight:
      losses["mae"] = mae_loss(s["pred"], s_images, mask, patch, plan.norm_pix_loss)
      loss = loss + plan.mae_weight * losses["mae"]
    return loss, (losses, model_state)

  return loss_fn


def build_task(
  config,
  student: DistillStudent,
  teacher: ViTEncoder,
  teacher_variables: dict,
  steps_per_epoch: int,
) -> loop_lib.Task:
  plan = make_plan(config)
  spec = variants.resolve(config.student)
  total, warmup = run_config.steps(config, steps_per_epoch)
  schedule = schedules.warmup_cosine(run_config.peak_lr(config), config.min_lr, total, warmup)
  dummy = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_chans))
  frozen = frozen_patterns(plan, spec.depth)

  def init_variables(rng):
    return student.init({"params": rng}, dummy, method=DistillStudent.init_all)

  return loop_lib.Task(
    name="distill",
    init_variables=init_variables,
    loss_fn=make_loss_fn(plan, student, teacher),
    make_optimizer=lambda params, sched: opt_lib.from_config(
      params, sched, config.optimizer, frozen=frozen
    ),
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    accumulate_steps=config.optimizer.accumulate_steps,
    inputs=teacher_variables,
    signature=signature(config, plan, spec),
  )


def signature(config, plan: Plan, spec) -> dict:
  distill = dataclasses.asdict(plan)
  sig = {
    "stage": "distill",
    "model": spec.kwargs(),
    "teacher": variants.resolve(config.teacher).kwargs(),
    "distill": distill,
    "decoder": (config.distill.decoder.to_dict() if plan.mae_weight else None),
  }
  if plan.student_dist:
    sig["dist_token"] = True
  else:  # workdirs of students without the token keep resuming
    del distill["dist_token"], distill["student_dist"]
  return sig


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The task with the configured teacher when its source exists (else a
  random one: speed does not depend on the weights) and a random batch."""
  validate(config, data=False)
  notes = []
  source = config.teacher.source
  if source and ("://" in source or workdir_lib.parse_source(source)[0].exists()):
    teacher, teacher_vars, _ = load_teacher(config)
    teacher_from = source
  else:
    teacher, teacher_vars = random_teacher(config)
    teacher_from = "random init"
    notes.append(
      "teacher: random init (teacher.source "
      + (f"{source!r} does not exist" if source else "is empty")
      + "); speed does not depend on the weights"
    )
  task = build_task(config, build_student(config), teacher, teacher_vars, steps_per_epoch)
  s_spec, t_spec = variants.resolve(config.student), variants.resolve(config.teacher)
  plan = make_plan(config)
  rng = np.random.default_rng(config.seed)
  image = random_images(config.batch_size, s_spec, rng)
  batch = {
    "image": image,
    "image_student": 255 - image,
    "label": np.zeros((config.batch_size,), np.int32),
  }
  info = {
    "image_size": s_spec.image_size,
    "fused_attention": bool(config.student.fused_attention),
    "teacher_fused_attention": bool(config.teacher.fused_attention),
    "remat": bool(config.student.remat),
    "scan_blocks": bool(config.student.scan_blocks),
    "teacher_scan_blocks": bool(config.teacher.scan_blocks),
    "teacher": teacher_from,
    "teacher_blocks_run": f"{plan.teacher_block}/{t_spec.depth}",
    "model": f"teacher w{t_spec.width} d{t_spec.depth} (runs {plan.teacher_block}) -> "
    f"student w{s_spec.width} d{s_spec.depth}, target {plan.target}",
  }
  return Synthetic("distill", task, batch, info, notes)


# -----------------------------------------------------------------------------
# 5. Run
# -----------------------------------------------------------------------------
def _relation_maps(config, result, teacher, teacher_variables, student, workdir) -> None:
  """Teacher vs student Q-K relation maps on a few eval images."""
  from mimdistill.visualize import relation_maps

  count = config.num_visualize
  state = result.state
  student_vars = relation_maps.host_copy(  # a collective on several hosts
    {"params": state.params["encoder"], "fixed": state.model_state["fixed"]["encoder"]}
  )
  if jax.process_index() != 0:
    return
  n = jax.device_count()  # a mesh-less pipeline checks the batch by it
  cfg = run_config.data_config(config, "eval", batch_size=-(-count // n) * n)
  cfg.num_workers = 0
  images = input_pipeline.make_dataset(
    cfg,
    split=config.data.eval_split,
    train=False,
    seed=config.seed,
    process_index=0,
    process_count=1,
  ).first_batch()["image"][:count]
  images = np.asarray(normalize(images))
  plan, enc = make_plan(config), student.encoder
  png = relation_maps.save_relation_maps(
    images,
    teacher,
    teacher_variables,
    enc,
    student_vars,
    workdir / "relation_maps.png",
    teacher_block=plan.teacher_block,
    student_block=enc.depth,
    heads=plan.relation_heads,
    student_heads=(plan.relation_heads if enc.width % plan.relation_heads == 0 else enc.num_heads),
  )
  log.info("wrote %s", png)


def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
  """Runs (or resumes) stage 2 in `workdir`; returns a summary dict."""
  validate(config)
  teacher, teacher_variables, parent = load_teacher(config)
  student = build_student(config)
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = input_pipeline.make_dataset(
    run_config.data_config(config, "distill"),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  task = build_task(config, student, teacher, teacher_variables, train_data.steps_per_epoch)
  record = {"stage": "distill", "parent": parent}
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
  if config.num_visualize:
    _relation_maps(config, result, teacher, teacher_variables, student, workdir)
  return {
    "stage": "distill",
    "workdir": str(workdir),
    "steps": task.total_steps,
    "teacher": parent.get("path"),
    "teacher_step": parent.get("step"),
    "first_logged": first,
    "final_loss": result.metrics.get("loss"),
    "train_seconds": result.metrics.get("train_seconds"),
  }
