"""AdamW with the official parameter groups, built from optax pieces.

Parameter groups are decided on Flax param paths (plain dict trees):
  * weight decay: none for 1-D params (biases, LayerNorm) as timm's
    `add_weight_decay` / MAE `param_groups_lrd` do, plus any name in
    `no_decay_names` (fine-tuning adds `pos_embed`, `cls_token`);
  * layer-wise lr decay (fine-tuning): `decay ** (depth + 1 - layer_id)` with
    cls/pos/patch_embed in layer 0, block i in layer i + 1, the rest last;
  * frozen params (e.g. the TinyMIM student's unused last-block weights): no
    update, no weight decay and no optimizer state, like a PyTorch param
    whose grad is None.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import jax
import optax

PyTree = Any
_BLOCK = re.compile(r"^blocks_(\d+)$")


def path_names(params: PyTree) -> PyTree:
  """Same tree with each leaf replaced by its '/'-joined path."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params
  )


def decay_mask(params: PyTree, no_decay_names: Iterable[str] = ()) -> PyTree:
  """True where weight decay applies."""
  skip = set(no_decay_names)
  return jax.tree_util.tree_map(
    lambda name, p: p.ndim > 1 and name.split("/")[-1] not in skip, path_names(params), params
  )


def layer_id(name: str, depth: int) -> int:
  """MAE `lr_decay.get_layer_id_for_vit` on a Flax path."""
  parts = [p for p in name.split("/") if p != "encoder"]
  if parts[0] in ("cls_token", "pos_embed", "patch_embed"):
    return 0
  m = _BLOCK.match(parts[0])
  if m:
    return int(m.group(1)) + 1
  return depth + 1


def layer_scales(params: PyTree, depth: int, decay: float) -> PyTree:
  num_layers = depth + 1
  return jax.tree_util.tree_map(
    lambda name: decay ** (num_layers - layer_id(name, depth)), path_names(params)
  )


def regex_mask(params: PyTree, patterns: Iterable[str]) -> PyTree:
  """True for leaves whose path fully matches any of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map(
    lambda name: any(c.fullmatch(name) for c in compiled), path_names(params)
  )


def adamw(
  params: PyTree,
  schedule: optax.Schedule,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  weight_decay: float = 0.05,
  no_decay_names: Iterable[str] = (),
  layer_decay: float | None = None,
  depth: int | None = None,
  frozen: Iterable[str] = (),
  clip_grad_norm: float | None = None,
  accumulate_steps: int = 1,
) -> optax.GradientTransformation:
  """The optimizer every stage uses; see the module docstring for groups.

  `schedule` is in loop steps (micro-batches). With `accumulate_steps=k` an
  update happens every k of them and update j uses the lr of micro-step j*k:
  MAE's engine sets the lr at the first micro-batch of each group.
  """
  if accumulate_steps > 1:
    per_micro_step = schedule
    schedule = lambda count: per_micro_step(count * accumulate_steps)  # noqa: E731
  parts = []
  if clip_grad_norm:
    parts.append(optax.clip_by_global_norm(clip_grad_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=b1,
      b2=b2,
      eps=1e-8,
      weight_decay=weight_decay,
      mask=decay_mask(params, no_decay_names),
    )
  )
  if layer_decay is not None and layer_decay != 1.0:
    if depth is None:
      raise ValueError("layer_decay needs the encoder depth")
    scales = layer_scales(params, depth, layer_decay)
    values = sorted(set(jax.tree_util.tree_leaves(scales)))
    labels = jax.tree_util.tree_map(lambda s: f"scale_{values.index(s)}", scales)
    parts.append(
      optax.multi_transform({f"scale_{i}": optax.scale(v) for i, v in enumerate(values)}, labels)
    )
  tx = optax.chain(*parts)
  frozen = list(frozen)
  if frozen:
    labels = jax.tree_util.tree_map(
      lambda f: "frozen" if f else "train", regex_mask(params, frozen)
    )
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps)
  return tx


def from_config(
  params: PyTree, schedule: optax.Schedule, section, **groups
) -> optax.GradientTransformation:
  """`adamw` with the betas, weight decay, clipping and accumulation of a
  stage config's `optimizer` section; `groups` adds the stage's parameter
  groups (`no_decay_names`, `layer_decay` + `depth`, `frozen`)."""
  return adamw(
    params,
    schedule,
    b1=section.b1,
    b2=section.b2,
    weight_decay=section.weight_decay,
    clip_grad_norm=section.clip_grad_norm,
    accumulate_steps=section.accumulate_steps,
    **groups,
  )
