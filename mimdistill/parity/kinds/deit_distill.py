"""Kind `deit_distill`: DeiT's `DistilledVisionTransformer` student (tokens
`[cls, dist, patches]`, `head` and `head_dist`; train mode returns both
logits, eval mode their average) with an MAE `models_vit` teacher, and
DeiT's `DistillationLoss` for the types none / soft / hard with both base
criteria (soft-target CE on mixup targets, plain CE), its parts, the extra
(alpha, tau) grid, every student gradient per type and the parameters that
get none; also the batch mixup that made the inputs and the fine-tuning
optimizer table (MAE `param_groups_lrd` and DeiT's weight decay) that the
fine-tuning stage applies to such a model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.data.mixup import mixup_target
from mimdistill.interop.official_names import flax_to_official, official_names_of, official_to_flax
from mimdistill.interop.pth_reader import load_pth
from mimdistill.models import factory
from mimdistill.objectives import kd_loss
from mimdistill.parity import official_args
from mimdistill.training.optimizer import decay_mask, layer_scales

BASES = {"soft_target_ce": kd_loss.soft_target_cross_entropy, "ce": kd_loss.cross_entropy}
# MAE main_finetune's `no_weight_decay()` (DeiT's model inherits timm's:
# dist_token is decayed).
NO_DECAY = ("pos_embed", "cls_token")


def _checkpoint(folder, config, who: str) -> str:
  names = sorted(config.get("checkpoints", {})) or sorted(p.name for p in folder.glob("*.pth"))
  match = [n for n in names if n.startswith(who)]
  if not match:
    raise ValueError(f"{folder}: no {who} checkpoint among {names}")
  return match[0]


def _load(folder, config, who: str) -> dict:
  tensors = load_pth(folder / _checkpoint(folder, config, who)).tensors
  variables, _ = official_to_flax(tensors, "classifier", learned_pos_embed=True)
  return jax.tree_util.tree_map(jnp.asarray, variables)


def _build(args: dict, *, dist_token: bool, global_pool: bool):
  section = official_args.vit_section(args, global_pool=global_pool, dist_token=dist_token)
  return factory.build("classifier", section, num_classes=int(args["num_classes"]))


def check(folder, config, report):
  case = folder.name
  s_args, t_args = config["student"], config["teacher"]
  student = _build(s_args, dist_token=True, global_pool=bool(s_args.get("global_pool", False)))
  teacher = _build(t_args, dist_token=False, global_pool=bool(t_args.get("global_pool", True)))
  s_vars = _load(folder, config, "student")
  t_vars = _load(folder, config, "teacher")
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  nhwc = lambda x: jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))
  images = nhwc(inputs["images"])
  num_classes = int(s_args["num_classes"])

  # -- the inputs: timm batch mixup of the raw images ----------------------------
  if "images_raw" in inputs and "mixup_lam" in inputs:
    lam = float(inputs["mixup_lam"])
    raw = inputs["images_raw"]
    mixed = raw * np.float32(lam) + raw[::-1] * np.float32(1.0 - lam)
    report.compare(case, "mixup/images", mixed, inputs["images"])
    smoothing = float(config.get("mixup", {}).get("label_smoothing", 0.0))
    targets = mixup_target(inputs["labels"], num_classes, lam, smoothing)
    report.compare(case, "mixup/soft_targets", targets, inputs["soft_targets"])

  # -- forwards ------------------------------------------------------------------
  t_logits = jax.jit(teacher.apply)(t_vars, images)
  report.compare(case, "teacher_logits", t_logits, expected["teacher_logits"])
  report.compare(
    case, "teacher_argmax", jnp.argmax(t_logits, axis=-1), expected["teacher_argmax"], tol=0
  )
  train_apply = jax.jit(functools.partial(student.apply, train=True))
  cls, dist = train_apply(s_vars, images)
  report.compare(case, "student_cls_logits", cls, expected["student_cls_logits"])
  report.compare(case, "student_dist_logits", dist, expected["student_dist_logits"])
  report.compare(
    case,
    "student_eval_logits",
    jax.jit(student.apply)(s_vars, images),
    expected["student_eval_logits"],
  )

  # -- losses --------------------------------------------------------------------
  base_targets = {
    "soft_target_ce": jnp.asarray(inputs["soft_targets"]),
    "ce": jnp.asarray(inputs["labels"]),
  }
  alpha, tau = float(config["alpha"]), float(config["tau"])

  def loss(outputs, base, kd_type, a, t):
    value, _ = kd_loss.distillation_loss(
      outputs, base_targets[base], t_logits, base=BASES[base], kd_type=kd_type, alpha=a, tau=t
    )
    return value

  for base, fn in BASES.items():
    key = f"base_loss/{base}"
    if key in expected:
      report.compare(case, key, fn(cls, base_targets[base]), expected[key])
  parts = {
    "soft": kd_loss.soft_distillation(dist, t_logits, tau),
    "hard": kd_loss.hard_distillation(dist, t_logits),
  }
  for kd_type, value in parts.items():
    if f"distillation_loss/{kd_type}" in expected:
      report.compare(
        case, f"distillation_loss/{kd_type}", value, expected[f"distillation_loss/{kd_type}"]
      )
  types = list(config.get("distillation_types", kd_loss.KD_TYPES))
  for base in BASES:
    for kd_type in types:
      key = f"loss/{base}/{kd_type}"
      if key in expected:
        report.compare(case, key, loss((cls, dist), base, kd_type, alpha, tau), expected[key])

  # -- the (alpha, tau) grid -------------------------------------------------------
  if "grid/alpha" in expected:
    grid = list(zip(expected["grid/alpha"].tolist(), expected["grid/tau"].tolist(), strict=True))
    for key in expected.files:
      if key.startswith("grid/loss/"):
        _, _, base, kd_type = key.split("/")
        got = [loss((cls, dist), base, kd_type, a, t) for a, t in grid]
        report.compare(case, key, np.asarray(got), expected[key])
    if "grid/distillation_loss/soft" in expected:
      got = [kd_loss.soft_distillation(dist, t_logits, t) for _, t in grid]
      report.compare(
        case,
        "grid/distillation_loss/soft",
        np.asarray(got),
        expected["grid/distillation_loss/soft"],
      )

  # -- gradients per type (base: soft-target CE, as with mixup) --------------------
  def objective(params, kd_type):
    outputs = student.apply({"params": params}, images, train=True)
    return loss(outputs, "soft_target_ce", kd_type, alpha, tau)

  grad_fn = jax.jit(jax.grad(objective), static_argnums=1)
  all_names = set(flax_to_official(s_vars, "classifier"))
  without = config.get("params_without_grad", {})
  for kd_type in types:
    grads = flax_to_official(
      {"params": jax.device_get(grad_fn(s_vars["params"], kd_type))}, "classifier"
    )
    prefix = f"grad/{kd_type}/"
    want = {k[len(prefix) :]: expected[k] for k in expected.files if k.startswith(prefix)}
    for name in sorted(want):
      if name not in grads:
        report.check(case, f"{prefix}{name}", False, "no such parameter in mimdistill")
      else:
        report.compare_relative(case, f"{prefix}{name}", grads[name], want[name])
    if kd_type in without:
      no_grad = sorted(n for n in all_names if n not in grads or not np.any(grads[n]))
      listed = sorted(without[kd_type])
      report.check(
        case,
        f"params_without_grad/{kd_type}",
        no_grad == listed,
        "" if no_grad == listed else f"mimdistill: {no_grad}; official: {listed}",
      )

  # -- the fine-tuning optimizer table of this model ---------------------------------
  params = s_vars["params"]
  wd = float(config.get("weight_decay", 0.05))
  decays = official_names_of({"params": decay_mask(params, NO_DECAY)}, "classifier")
  if "param_groups_mae_lrd" in config:
    decay = float(config["layer_decay"])
    scales = official_names_of(
      {"params": layer_scales(params, int(s_args["depth"]), decay)}, "classifier"
    )
    want = config["param_groups_mae_lrd"]
    names_ok = sorted(want) == sorted(scales)
    report.check(
      case,
      "param_groups_mae_lrd:names",
      names_ok,
      "" if names_ok else f"{sorted(set(want) ^ set(scales))}",
    )
    common = sorted(set(want) & set(scales))
    report.compare(
      case,
      "param_groups_mae_lrd:lr_scale",
      [float(scales[n]) for n in common],
      [want[n]["lr_scale"] for n in common],
      tol=1e-12,
    )
    report.compare(
      case,
      "param_groups_mae_lrd:weight_decay",
      [wd if decays[n] else 0.0 for n in common],
      [want[n]["weight_decay"] for n in common],
      tol=0,
    )
  if "weight_decay_deit" in config:
    want = config["weight_decay_deit"]
    common = sorted(set(want) & set(decays))
    report.check(case, "weight_decay_deit:names", sorted(want) == sorted(decays))
    report.compare(
      case,
      "weight_decay_deit",
      [wd if decays[n] else 0.0 for n in common],
      [want[n] for n in common],
      tol=0,
    )
