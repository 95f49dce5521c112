"""TinyMIM's segmentation optimizer: AdamW with the parameter groups of its
`mmcv_custom/layer_decay_optimizer_constructor.py` (identical for TinyMIM
and TinyMIM*-T), decided on Flax param paths of the segmentor tree through
their official names (`interop.segmentation_names.official_name`).

Layer ids (`num_layers = paramwise_cfg.num_layers + 2`):
`backbone.cls_token`, `backbone.mask_token`, `backbone.pos_embed` and
`backbone.patch_embed.*` -> 0; `backbone.blocks.<i>.*` -> i + 1; everything
else (the necks, both heads, TinyMIM*-T's `dist_token` and `conv1x1`) ->
`num_layers - 1`. lr scale = `rate ** (num_layers - layer_id - 1)`.

Weight decay, as the official code produces it: 0 for 1-D params and names
ending in `.bias`; its `name in ('pos_embed', 'cls_token')` test never
matches a `backbone.`-prefixed name, so `pos_embed`, `cls_token`,
`dist_token` and every `relative_position_bias_table` ARE decayed
(`no_decay='official'`, the default). `no_decay='intended'` also exempts
those (BEiT's intent: the model's `no_weight_decay()` names plus the
relative position tables).

`segmentation_adamw` builds one optax AdamW per group (torch AdamW: eps
1e-8 outside the square root, decoupled decay scaled by the group's lr),
each with its own schedule from its own initial lr `lr_scale * base_lr`
(mmcv's lr hooks scale each group from its initial lr; with a nonzero
`min_lr` that is not `lr_scale` times the base schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from mimdistill.interop.segmentation_names import official_name

PyTree = Any
NO_DECAY_MODES = ("official", "intended")
INTENDED_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table")


def layer_id(name: str, num_layers: int) -> int:
  """`get_num_layer_for_vit(name, num_layers)` of the official constructor
  (`num_layers` already includes the + 2)."""
  if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
    return 0
  if name.startswith("backbone.patch_embed"):
    return 0
  if name.startswith("backbone.blocks"):
    return int(name.split(".")[2]) + 1
  return num_layers - 1


def decays(name: str, ndim: int, no_decay: str = "official") -> bool:
  if no_decay not in NO_DECAY_MODES:
    raise ValueError(f"no_decay={no_decay!r}; use one of {NO_DECAY_MODES}")
  if ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"):
    return False
  return not (no_decay == "intended" and name.split(".")[-1] in INTENDED_NO_DECAY)


def _names(params: PyTree) -> PyTree:
  return jax.tree_util.tree_map_with_path(
    lambda path, _: official_name([str(getattr(k, "key", k)) for k in path]), params
  )


def param_groups(
  params: PyTree,
  *,
  num_layers: int,
  layer_decay_rate: float,
  weight_decay: float = 0.05,
  no_decay: str = "official",
) -> PyTree:
  """Same tree with `(layer_id, lr_scale, weight_decay)` per param;
  `num_layers` is the config's (the backbone depth), + 2 is added here."""
  total = num_layers + 2

  def group(name, p):
    lid = layer_id(name, total)
    wd = weight_decay if decays(name, p.ndim, no_decay) else 0.0
    return (lid, layer_decay_rate ** (total - lid - 1), wd)

  return jax.tree_util.tree_map(group, _names(params), params)


def segmentation_adamw(
  params: PyTree,
  base_lr: float,
  schedule_for: Callable[[float], optax.Schedule],
  *,
  num_layers: int,
  layer_decay_rate: float,
  b1: float = 0.9,
  b2: float = 0.999,
  weight_decay: float = 0.05,
  no_decay: str = "official",
) -> optax.GradientTransformation:
  """AdamW over the constructor's groups; `schedule_for(initial_lr)` makes
  a group's schedule from its initial lr `lr_scale * base_lr`, e.g.
  `lambda lr: poly_schedule.poly_warmup(lr, 160_000, warmup_iters=1500,
  warmup_ratio=1e-6)`."""
  groups = param_groups(
    params,
    num_layers=num_layers,
    layer_decay_rate=layer_decay_rate,
    weight_decay=weight_decay,
    no_decay=no_decay,
  )
  is_group = lambda x: isinstance(x, tuple)
  leaves = sorted(set(jax.tree_util.tree_leaves(groups, is_leaf=is_group)))
  label = lambda g: f"layer_{g[0]}_{'decay' if g[2] else 'no_decay'}"
  labels = jax.tree_util.tree_map(label, groups, is_leaf=is_group)
  transforms = {
    label(g): optax.adamw(schedule_for(g[1] * base_lr), b1=b1, b2=b2, eps=1e-8, weight_decay=g[2])
    for g in leaves
  }
  return optax.multi_transform(transforms, labels)
