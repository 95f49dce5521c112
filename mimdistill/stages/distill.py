"""Stage 2: TinyMIM distillation of a frozen MIM teacher into a small ViT.

Reads top to bottom:
  1. `validate`: every config check that needs no checkpoint and no data;
  2. the teacher: `load_teacher` restores it from a stage-1 (or stage-2)
     workdir or an official `.pth`, checks its shapes against the teacher
     config and keeps only what the target block needs (blocks after the
     target are never loaded, let alone run);
  3. the student: a `ViTEncoder` under params key `encoder`, plus the
     trainable heads some ablation targets need under `heads` (a linear
     projection to the teacher width, an MAE decoder). The `encoder` subtree
     is exactly a ViT encoder's params, so the next link of a sequential
     distillation (or fine-tuning) restores it by name;
  4. `build_task`: the loss, the optimizer with the student parameters that
     get no gradient frozen (no update, no weight decay, no state);
  5. `run`: data, the shared loop, the summary.

The teacher's variables are the loop's non-trained `inputs`: sharded like
params, passed to every step, differentiated never (its outputs go through
`stop_gradient`), never in the optimizer state nor in a checkpoint;
`lineage.json` records where they came from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimdistill.data import input_pipeline, sources
from mimdistill.interop.encoder_source import read_encoder, shape_table
from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models import zoo
from mimdistill.models.mae import MAEDecoder, random_masking
from mimdistill.models.vit import ViTEncoder, dense_init, drop_path_rates
from mimdistill.objectives import distill_targets as targets_lib
from mimdistill.objectives.mae_loss import mae_loss
from mimdistill.objectives.relations import RELATION_SETS
from mimdistill.paths import as_path
from mimdistill.training import checkpoints as ckpt_lib
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib
from mimdistill.training.run_config import data_config

log = logging.getLogger("mimdistill")
PyTree = Any

# TinyMIM takes ViT-L's relations at block 18 of 24; any other depth uses its
# last block (ViT-B/S: 12 of 12).
DEFAULT_TEACHER_BLOCK = {24: 18}
STUDENT_INPUTS = ("raw", "masked")


# -----------------------------------------------------------------------------
# 1. What the config asks for
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
  """The distillation, resolved and validated from `config.distill`."""

  target: str  # 'relation' | 'cls' | 'feature'
  teacher_block: int  # 1-based
  relation_heads: int  # R
  relation_set: str = "qk_vv"
  softmax: bool = True
  raw_loss: str = "mse"
  feature: str = "output"
  beta: float = 2.0
  masked: bool = False
  mask_ratio: float = 0.75
  mae_weight: float = 0.0
  norm_pix_loss: bool = True

  @property
  def needs_projection(self) -> bool:
    return self.target in ("cls", "feature")


def teacher_block(config) -> int:
  spec = zoo.resolve(config.teacher)
  block = int(config.teacher.get("block") or 0)
  return block or DEFAULT_TEACHER_BLOCK.get(spec.depth, spec.depth)


def relation_heads(config) -> int:
  return int(config.distill.get("relation_heads") or 0) or zoo.resolve(config.teacher).num_heads


def make_plan(config) -> Plan:
  d = config.distill
  return Plan(
    target=d.target,
    teacher_block=teacher_block(config),
    relation_heads=relation_heads(config),
    relation_set=d.get("relation_set", "qk_vv"),
    softmax=d.get("softmax", True),
    raw_loss=d.get("raw_loss", "mse"),
    feature=d.get("feature", "output"),
    beta=float(d.get("beta", 2.0)),
    masked=d.get("student_input", "raw") == "masked",
    mask_ratio=float(d.get("mask_ratio", 0.75)),
    mae_weight=float(d.get("mae_weight", 0.0)),
    norm_pix_loss=d.get("norm_pix_loss", True),
  )


def _divisors_of_both(a: int, b: int) -> list[int]:
  g = math.gcd(a, b)
  return [r for r in range(1, g + 1) if g % r == 0]


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check that can fail before a checkpoint or data is read."""
  student = zoo.resolve(config.student)
  teacher = zoo.resolve(config.teacher)
  d = config.distill
  if d.target not in targets_lib.TARGETS:
    raise ValueError(f"distill.target={d.target!r} is not one of {targets_lib.TARGETS}")
  if d.get("relation_set", "qk_vv") not in RELATION_SETS:
    raise ValueError(
      f"distill.relation_set={d.relation_set!r} is not one of {sorted(RELATION_SETS)}"
    )
  if d.get("raw_loss", "mse") not in targets_lib.RAW_RELATION_LOSSES:
    raise ValueError(
      f"distill.raw_loss={d.raw_loss!r} is not one of {targets_lib.RAW_RELATION_LOSSES}"
    )
  if d.get("feature", "output") not in targets_lib.FEATURE_TYPES:
    raise ValueError(
      f"distill.feature={d.feature!r} is not one of {sorted(targets_lib.FEATURE_TYPES)}"
    )
  if d.get("student_input", "raw") not in STUDENT_INPUTS:
    raise ValueError(f"distill.student_input={d.student_input!r} is not one of {STUDENT_INPUTS}")
  plan = make_plan(config)
  if plan.masked and not 0 < plan.mask_ratio < 1:
    raise ValueError(f"distill.mask_ratio={plan.mask_ratio} must be in (0, 1)")
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
  if not config.teacher.get("source"):
    raise ValueError(
      "teacher.source is empty; set --config.teacher.source= a "
      "stage-1/stage-2 workdir (optionally workdir:step) or an "
      "official .pth file"
    )
  sources.check_available(config.data.name, config.data.get("data_dir"))
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))


# -----------------------------------------------------------------------------
# 2. The teacher
# -----------------------------------------------------------------------------
def build_teacher(config, depth: int | None = None) -> ViTEncoder:
  """The teacher encoder truncated after the target block (`depth` overrides
  the truncation: the full teacher is only built to check shapes). The final
  norm exists only when the target block is the teacher's last."""
  spec = zoo.resolve(config.teacher)
  depth = depth or teacher_block(config)
  return ViTEncoder(
    width=spec.width,
    depth=depth,
    num_heads=spec.num_heads,
    patch_size=spec.patch_size,
    image_size=spec.image_size,
    in_chans=spec.in_chans,
    mlp_ratio=spec.mlp_ratio,
    final_norm=depth == spec.depth,
    dtype=run_config.compute_dtype(config),
    fused_attention=config.teacher.get("fused_attention", False),
    scan_blocks=config.teacher.get("scan_blocks", False),
  )


def _abstract_variables(model: ViTEncoder) -> dict:
  dummy = jnp.zeros((1, model.image_size, model.image_size, model.in_chans))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)


def _natural(name: str):
  """Sort key: blocks_2 before blocks_10."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _describe(spec: zoo.EncoderSpec) -> str:
  return (
    f"width={spec.width} depth={spec.depth} num_heads={spec.num_heads} "
    f"patch_size={spec.patch_size} image_size={spec.image_size}"
  )


def _source_hint(source: str) -> str:
  """What a workdir's config.json says its model is, for error messages."""
  workdir, _ = ckpt_lib.parse_source(source)
  saved = ckpt_lib.read_json(workdir, "config.json") if workdir.is_dir() else None
  model = (saved or {}).get("signature", {}).get("model")
  if not model:
    return ""
  return (
    " (its config.json says: "
    + " ".join(
      f"{k}={model[k]}"
      for k in ("width", "depth", "num_heads", "patch_size", "image_size")
      if k in model
    )
    + ")"
  )


def check_teacher_shapes(variables: dict, config, source: str) -> None:
  """Raises, listing every difference, unless `variables` fit the teacher."""
  spec = zoo.resolve(config.teacher)
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
  """Only the leaves the truncated teacher has, as float32 numpy arrays."""
  template = _abstract_variables(build_teacher(config))

  def take(tmpl, tree):
    return {
      k: (take(v, tree[k]) if isinstance(v, dict) else np.asarray(tree[k], np.float32))
      for k, v in tmpl.items()
    }

  return take(dict(template), dict(variables))


def load_teacher(config) -> tuple[ViTEncoder, dict, dict]:
  """(truncated teacher module, its variables, lineage record of the source)."""
  source = config.teacher.source
  variables, record = read_teacher_source(source)
  variables = {k: v for k, v in variables.items() if k in ("params", "fixed")}
  if "fixed" not in variables:
    # A checkpoint without the fixed sin-cos buffer: it is a function of the
    # architecture, so compute it.
    spec = zoo.resolve(config.teacher)
    grid = spec.image_size // spec.patch_size
    variables["fixed"] = {"pos_embed": pos_embed_lib.sincos_2d(spec.width, grid)[None]}
  check_teacher_shapes(variables, config, source)
  record.update(block=teacher_block(config), model=zoo.resolve(config.teacher).kwargs())
  return build_teacher(config), prune_teacher(variables, config), record


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
class DistillHeads(nn.Module):
  """Trainable heads of the ablation targets (params key `heads`)."""

  proj_width: int = 0  # > 0: Linear(student width -> this)
  decoder_spec: tuple | None = None  # (width, depth, heads) of an MAE decoder
  num_patches: int = 0
  out_dim: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    if self.proj_width:
      self.proj = nn.Dense(self.proj_width, dtype=self.dtype, kernel_init=dense_init)
    if self.decoder_spec:
      width, depth, heads = self.decoder_spec
      self.decoder = MAEDecoder(
        width, depth, heads, self.num_patches, self.out_dim, dtype=self.dtype
      )


class DistillStudent(nn.Module):
  """The student encoder (params `encoder`) and its heads (params `heads`)."""

  encoder: ViTEncoder
  heads: DistillHeads | None = None

  def __call__(
    self,
    images,
    *,
    train: bool = False,
    ids_keep=None,
    ids_restore=None,
    relation_heads: int = 0,
    feature: str | None = None,
    cls: bool = False,
    reconstruct: bool = False,
  ) -> dict:
    """Student outputs; only what is asked for is computed.

    relation_heads=R: q, k, v `(B, R, N, D/R)` of the last block's norm1+qkv;
    feature: a feature type of the last block, projected to the teacher width;
    cls: the output CLS token, projected; reconstruct: MAE pixel predictions.
    """
    enc = self.encoder
    tokens = enc.embed_patches(images)
    if ids_keep is not None:
      tokens = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
    x = enc.run_blocks(enc.prepend_prefix(tokens), enc.depth - 1, train)
    last = enc.blocks[enc.depth - 1]
    out = {}
    if relation_heads:
      out["qkv"] = last.relation_qkv(x, relation_heads)
    if feature not in (None, "output"):
      out["feature"] = self.heads.proj(last.features(x)[feature])
    if cls or feature == "output" or reconstruct:
      y = last(x, train=train)
      if enc.final_norm:
        y = enc.norm(y)
      if cls:
        out["cls"] = self.heads.proj(y[:, 0])
      if feature == "output":
        out["feature"] = self.heads.proj(y)
      if reconstruct:
        out["pred"] = self.heads.decoder(y, ids_restore, train=train)
    return out

  def init_all(self, images):
    """Touches every parameter (the unused last-block ones included: the
    student stays a complete ViT for fine-tuning)."""
    b = images.shape[0]
    ids_restore = jnp.broadcast_to(
      jnp.arange(self.encoder.num_patches), (b, self.encoder.num_patches)
    )
    y = self.encoder(images)
    if self.heads is not None:
      if self.heads.proj_width:
        self.heads.proj(y)
      if self.heads.decoder_spec:
        self.heads.decoder(y, ids_restore)
    return y


def build_student(config) -> DistillStudent:
  spec = zoo.resolve(config.student)
  teacher = zoo.resolve(config.teacher)
  plan = make_plan(config)
  dtype = run_config.compute_dtype(config)
  rates = drop_path_rates(
    float(config.student.get("drop_path", 0.1)),
    spec.depth,
    config.student.get("drop_path_schedule", "constant_but_last"),
  )
  encoder = ViTEncoder(
    width=spec.width,
    depth=spec.depth,
    num_heads=spec.num_heads,
    patch_size=spec.patch_size,
    image_size=spec.image_size,
    in_chans=spec.in_chans,
    mlp_ratio=spec.mlp_ratio,
    drop_path=rates,
    dtype=dtype,
    fused_attention=config.student.get("fused_attention", False),
    remat=config.student.get("remat", False),
    scan_blocks=config.student.get("scan_blocks", False),
  )
  decoder = None
  if plan.mae_weight:
    dec = config.distill.decoder
    decoder = (int(dec.width), int(dec.depth), int(dec.num_heads))
  heads = None
  if plan.needs_projection or decoder:
    heads = DistillHeads(
      proj_width=teacher.width if plan.needs_projection else 0,
      decoder_spec=decoder,
      num_patches=spec.num_patches,
      out_dim=spec.patch_size**2 * spec.in_chans,
      dtype=dtype,
    )
  return DistillStudent(encoder=encoder, heads=heads)


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


# -----------------------------------------------------------------------------
# 4. The task for the shared loop
# -----------------------------------------------------------------------------
def make_loss_fn(plan: Plan, student: DistillStudent, teacher: ViTEncoder):
  spec = student.encoder
  num_patches = spec.num_patches

  def loss_fn(params, fixed, batch, rng, inputs):
    t_images, s_images = batch["image"], batch.get("image_student", batch["image"])
    mask_rng, drop_rng = jax.random.split(rng)
    ids_keep = ids_restore = mask = None
    if plan.masked:
      noise = jax.random.uniform(mask_rng, (s_images.shape[0], num_patches))
      ids_keep, mask, ids_restore = random_masking(noise, plan.mask_ratio)
    t = teacher_outputs(teacher, inputs, t_images, plan, ids_keep)
    s = student.apply(
      {"params": params, "fixed": fixed},
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
      losses["mae"] = mae_loss(s["pred"], s_images, mask, spec.patch_size, plan.norm_pix_loss)
      loss = loss + plan.mae_weight * losses["mae"]
    return loss, losses

  return loss_fn


def build_task(
  config,
  student: DistillStudent,
  teacher: ViTEncoder,
  teacher_variables: dict,
  steps_per_epoch: int,
) -> loop_lib.Task:
  plan = make_plan(config)
  spec = zoo.resolve(config.student)
  total, warmup = run_config.steps(config, steps_per_epoch)
  schedule = schedules.warmup_cosine(run_config.peak_lr(config), config.min_lr, total, warmup)
  dummy = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_chans))
  frozen = frozen_patterns(plan, spec.depth)

  def init_variables(rng):
    return student.init({"params": rng}, dummy, method=DistillStudent.init_all)

  def make_optimizer(params, sched):
    o = config.optimizer
    return opt_lib.adamw(
      params,
      sched,
      b1=o.b1,
      b2=o.b2,
      weight_decay=o.weight_decay,
      frozen=frozen,
      clip_grad_norm=o.get("clip_grad_norm"),
      accumulate_steps=o.get("accumulate_steps", 1),
    )

  return loop_lib.Task(
    name="distill",
    init_variables=init_variables,
    loss_fn=make_loss_fn(plan, student, teacher),
    make_optimizer=make_optimizer,
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    inputs=teacher_variables,
    signature={
      "stage": "distill",
      "model": spec.kwargs(),
      "teacher": zoo.resolve(config.teacher).kwargs(),
      "distill": dataclasses.asdict(plan),
      "decoder": (config.distill.decoder.to_dict() if plan.mae_weight else None),
    },
  )


# -----------------------------------------------------------------------------
# 5. Run
# -----------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir, lineage: dict | None = None, mesh=None):
  """Runs (or resumes) stage 2 in `workdir`; returns a summary dict."""
  validate(config)
  teacher, teacher_variables, parent = load_teacher(config)
  student = build_student(config)
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = input_pipeline.make_dataset(
    data_config(config, "distill"),
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

  state = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=record,
    on_log=on_log,
  )
  count = int(config.get("num_visualize", 3))
  if count:
    # Teacher vs student Q-K relation maps on a few eval images.
    from mimdistill.visualize import relation_maps

    student_vars = relation_maps.host_copy(  # a collective on several hosts
      {"params": state.params["encoder"], "fixed": state.fixed["encoder"]}
    )
    if jax.process_index() == 0:
      n = jax.device_count()  # a mesh-less pipeline checks the batch by it
      cfg = data_config(config, "eval", batch_size=-(-count // n) * n)
      cfg.num_workers = 0
      images = next(
        iter(
          input_pipeline.make_dataset(
            cfg,
            split=config.data.eval_split,
            train=False,
            seed=config.seed,
            process_index=0,
            process_count=1,
          )
        )
      )["image"][:count]
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
        student_heads=(
          plan.relation_heads if enc.width % plan.relation_heads == 0 else enc.num_heads
        ),
      )
      log.info("wrote %s", png)
  final = ckpt_lib.read_json(workdir, "final_metrics.json") or {}
  return {
    "stage": "distill",
    "workdir": str(workdir),
    "steps": task.total_steps,
    "teacher": parent.get("path"),
    "teacher_step": parent.get("step"),
    "first_logged": first,
    "final_loss": final.get("loss"),
    "train_seconds": final.get("train_seconds"),
  }
