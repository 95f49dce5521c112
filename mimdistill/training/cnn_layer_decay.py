"""Layer-wise lr decay and weight-decay groups for CNN fine-tuning, as SparK
computes them (keyu-tian/SparK `downstream_imagenet/lr_decay.get_param_groups`
with `models/__init__.py`'s `get_layer_id_and_scale_exp`), on Flax param
paths (`layer2_3/conv1/kernel`, `stages_2_10/dwconv/kernel`; an `encoder/`
prefix is ignored). Every function returns a tree shaped like the params.

lr of a param = lr * lr_scale ** scale_exp with scale_exp = N + 1 - layer_id;
SparK applies it only for 0 < lr_scale < 1 (else every scale is 1).
Weight decay = wd * weight_decay_scale: 0 for 1-D params, biases and names
containing a no-decay key ({'cls_token', 'pos_embed', 'mask_token',
'gamma'}), 1 otherwise.

ResNet (SparK's rule): (L2, L3) = (len(layer2), len(layer3)) picks the
blocks per lr layer (blk2, blk3): (2, 3) for (4, 6) and (4, 23) (ResNet-50 /
101, and ResNet-34, whose stage lengths are ResNet-50's), (4, 4) for (8, 36)
and (24, 36), (5, 6) for (30, 48); N2 = ceil(L2 / blk2), N3 = ceil(L3 /
blk3), N = 2 + N2 + N3; stem -> 0, layer1 -> 1, layer2 block b -> 2 + b //
blk2, layer3 block b -> 2 + N2 + b // blk3, layer4 -> N, fc -> N + 1.

SparK's code has no rule for any other (L2, L3), e.g. ResNet-18 (2, 2), and
raises NotImplementedError (`rule='spark'` does the same, as a ValueError).
`rule='extended'` (the default) adds OUR OWN rule there, not SparK's:
blk = ceil(L / 2) for each of layer2 and layer3, so that every ResNet keeps
ResNet-50's ladder of at most 2 lr layers per middle stage (ResNet-18: one
block per lr layer, N = 6, ids 0..7 exactly as ResNet-50's). The reason: the
decay factor SparK tunes (0.7 for ResNet-50) then spans the same number of
steps from the stem to the classifier, whatever the depth.

ConvNeXt (SparK's rule, official names): N = 12 if len(stages[2]) > 9 else
6; downsample_layers.0 -> 0, downsample_layers.1 / .2 -> 2 / 3,
downsample_layers.3 -> N; stages.0 / .1 -> 1 / 2; stages.2 block b -> 3 + b
// 3; stages.3 -> N; everything else (norm, head) -> N + 1.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import optax

from mimdistill.training.optimizer import path_names

PyTree = Any
NO_DECAY_KEYS = ("cls_token", "pos_embed", "mask_token", "gamma")
RULES = ("extended", "spark")
# SparK's (len(layer2), len(layer3)) -> (blocks per lr layer in layer2, in layer3).
SPARK_RESNET_GROUPS = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4)}
SPARK_RESNET_GROUPS[(30, 48)] = (5, 6)


def _parts(name: str) -> list[str]:
  parts = name.split("/")
  return parts[1:] if parts and parts[0] == "encoder" else parts


def family_of_params(params: PyTree) -> str:
  top = set(params.get("encoder", params))
  if "conv1" in top and any(k.startswith("layer1_") for k in top):
    return "resnet"
  if any(k.startswith("downsample_layers_") for k in top):
    return "convnext"
  raise ValueError(f"not a ResNet or ConvNeXt param tree (top-level keys: {sorted(top)[:8]})")


def _count(top, pattern: str) -> int:
  return len({m.group(1) for k in top if (m := re.fullmatch(pattern, k))})


def resnet_groups(len2: int, len3: int, rule: str = "extended") -> tuple[int, int]:
  """Blocks per lr layer in layer2 and layer3 (see the module docstring)."""
  if rule not in RULES:
    raise ValueError(f"unknown layer-decay rule {rule!r}; use one of {RULES}")
  if (len2, len3) in SPARK_RESNET_GROUPS:
    return SPARK_RESNET_GROUPS[(len2, len3)]
  if rule == "spark":
    raise ValueError(
      f"SparK's ResNet layer-decay rule has no grouping for len(layer2), len(layer3) = "
      f"({len2}, {len3}); it knows {sorted(SPARK_RESNET_GROUPS)}. Use rule='extended' for "
      "mimdistill's own rule (one or two lr layers per middle stage)"
    )
  return max(1, math.ceil(len2 / 2)), max(1, math.ceil(len3 / 2))


def resnet_layer_id(name: str, len2: int, len3: int, rule: str = "extended") -> tuple[int, int]:
  """(layer_id, scale_exp) of a ResNet param path."""
  blk2, blk3 = resnet_groups(len2, len3, rule)
  n2, n3 = math.ceil(len2 / blk2 - 1e-5), math.ceil(len3 / blk3 - 1e-5)
  n = 2 + n2 + n3
  head = _parts(name)[0]
  m = re.fullmatch(r"layer(\d+)_(\d+)", head)
  if m:
    stage, block = int(m.group(1)), int(m.group(2))
    layer = {1: 1, 2: 2 + block // blk2, 3: 2 + n2 + block // blk3}.get(stage, n)
  elif head == "fc":
    layer = n + 1
  else:
    layer = 0
  return layer, n + 1 - layer


def convnext_layer_id(name: str, len_stage2: int) -> tuple[int, int]:
  """(layer_id, scale_exp) of a ConvNeXt param path."""
  n = 12 if len_stage2 > 9 else 6
  head = _parts(name)[0]
  m = re.fullmatch(r"downsample_layers_(\d+)_\d+", head)
  s = re.fullmatch(r"stages_(\d+)_(\d+)", head)
  if m:
    stage = int(m.group(1))
    layer = 0 if stage == 0 else (stage + 1 if stage in (1, 2) else n)
  elif s:
    stage, block = int(s.group(1)), int(s.group(2))
    layer = stage + 1 if stage in (0, 1) else (3 + block // 3 if stage == 2 else n)
  else:
    layer = n + 1
  return layer, n + 1 - layer


def layer_ids(params: PyTree, rule: str = "extended") -> PyTree:
  """(layer_id, scale_exp) per leaf."""
  family = family_of_params(params)
  top = set(params.get("encoder", params))
  if family == "resnet":
    len2, len3 = _count(top, r"layer2_(\d+)"), _count(top, r"layer3_(\d+)")
    fn = lambda name: resnet_layer_id(name, len2, len3, rule)
  else:
    len2 = _count(top, r"stages_2_(\d+)")
    fn = lambda name: convnext_layer_id(name, len2)
  return jax.tree_util.tree_map(fn, path_names(params))


def lr_scales(params: PyTree, lr_scale: float, rule: str = "extended") -> PyTree:
  """`lr_scale ** scale_exp` per leaf; all 1 unless 0 < lr_scale < 1
  (SparK's `using_lr_scale`)."""
  if not 0.0 < lr_scale < 1.0:
    return jax.tree_util.tree_map(lambda _: 1.0, params)
  return jax.tree_util.tree_map(
    lambda ids: lr_scale ** ids[1], layer_ids(params, rule), is_leaf=lambda x: isinstance(x, tuple)
  )


def weight_decay_scales(params: PyTree, no_decay_keys=NO_DECAY_KEYS) -> PyTree:
  """SparK's `weight_decay_scale`: 0 for 1-D params, biases and names
  containing a no-decay key, 1 otherwise."""

  def scale(name, p):
    leaf = name.split("/")[-1]
    return 0.0 if p.ndim == 1 or leaf == "bias" or any(k in name for k in no_decay_keys) else 1.0

  return jax.tree_util.tree_map(scale, path_names(params), params)


def scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
  """Multiplies each update by its leaf of `scales` (e.g. `lr_scales`): the
  per-group `lr * lr_scale` of SparK's param groups, after any optimizer
  (AdamW, LAMB) whose own update is linear in the lr."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
