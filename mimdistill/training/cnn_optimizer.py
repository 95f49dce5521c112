"""The optimizer of the CNN stages (SparK pre-training, heterogeneous
distillation, CNN fine-tuning) with SparK's parameter groups, from a stage
config's `optimizer` section.

SparK builds its param groups with `get_param_groups` (pre-training:
`pretrain/utils/lr_control.py`, fine-tuning:
`downstream_imagenet/lr_decay.py`) and anneals every group's lr and weight
decay per iteration (`lr_wd_annealing`): group lr = lr(t) * lr_scale,
weight decay = wd(t) * weight_decay_scale (`training/cnn_layer_decay.py`:
0 for 1-D params, biases, mask tokens and layer-scale gammas). Optimizers
(`optimizer.name`):
  'lamb'   timm's LAMB (`training/lamb.py`), `bias_correction` and
           `always_adapt` as the section says (SparK pre-training: True /
           False; fine-tuning: False / True);
  'adamw'  torch AdamW (decoupled decay, eps 1e-8), SparK's ConvNeXt recipe.
`clip_grad_norm > 0` clips the global gradient norm first (LAMB's
`max_grad_norm`); `accumulate_steps` as every stage (`optax.MultiSteps`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from mimdistill.training import cnn_layer_decay
from mimdistill.training.lamb import scale_by_timm_lamb

PyTree = Any
NAMES = ("lamb", "adamw")


def check(section) -> None:
  """One-line errors for the section's fields (before anything compiles)."""
  if section.name not in NAMES:
    raise ValueError(f"optimizer.name={section.name!r} is not one of {NAMES}")
  if section.layer_decay_rule not in cnn_layer_decay.RULES:
    raise ValueError(
      f"optimizer.layer_decay_rule={section.layer_decay_rule!r} is not one of "
      f"{cnn_layer_decay.RULES}"
    )
  eps = section.get("eps")
  if eps is not None and not (isinstance(eps, (int, float)) and 0 < eps < float("inf")):
    # a zero eps divides by a zero second moment on any leaf with a zero gradient
    raise ValueError(f"optimizer.eps={eps!r} must be a finite number > 0 (SparK: 1e-6)")
  end = section.get("weight_decay_end")
  if end is not None and not (isinstance(end, (int, float)) and 0 <= end < float("inf")):
    raise ValueError(
      f"optimizer.weight_decay_end={end!r} must be a finite number >= 0: the weight decay the "
      "cosine ends at (SparK: 0.2)"
    )


def from_config(
  params: PyTree,
  schedule: optax.Schedule,
  section,
  *,
  weight_decay: float | optax.Schedule,
  layer_decay: float = 1.0,
) -> optax.GradientTransformation:
  """`weight_decay`: the rate or its schedule (SparK pre-training anneals
  it); `layer_decay`: SparK's `lr_scale` (lr scale `layer_decay **
  scale_exp` per leaf when it is in (0, 1), see `cnn_layer_decay`)."""
  check(section)
  k = section.accumulate_steps
  if k > 1:
    # Schedules are in loop steps (micro-batches); update j uses step j * k.
    schedule = _per_update(schedule, k)
    if callable(weight_decay):
      weight_decay = _per_update(weight_decay, k)
  wd_scales = cnn_layer_decay.weight_decay_scales(params)
  parts = []
  if section.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(section.clip_grad_norm))
  if section.name == "lamb":
    parts += [
      scale_by_timm_lamb(
        b1=section.b1,
        b2=section.b2,
        eps=section.eps,
        weight_decay=weight_decay,
        weight_decay_scales=wd_scales,
        bias_correction=section.bias_correction,
        always_adapt=section.always_adapt,
      ),
      optax.scale_by_schedule(schedule),
    ]
  else:
    mask = jax.tree_util.tree_map(lambda s: s > 0, wd_scales)
    parts += [
      optax.scale_by_adam(b1=section.b1, b2=section.b2, eps=section.eps),
      optax.add_decayed_weights(weight_decay, mask=mask),
      optax.scale_by_learning_rate(schedule),
    ]
  if 0.0 < layer_decay < 1.0:
    scales = cnn_layer_decay.lr_scales(params, layer_decay, section.layer_decay_rule)
    parts.append(cnn_layer_decay.scale_by_tree(scales))
  tx = optax.chain(*parts)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx


def _per_update(schedule, k: int):
  return lambda count: schedule(count * k)
