"""mmcv segmentation checkpoints <-> mimdistill segmentor variables.

An mmseg / TinyMIM segmentation checkpoint is `{'meta': {...},
'state_dict': EncoderDecoder state dict}` with names `backbone.*`,
`decode_head.*`, `auxiliary_head.*`. The Flax trees (`models/segmentor.py`)
mirror those names, so the mapping is mechanical:

  * `backbone.<ViT name>` (`cls_token`, `dist_token`, `pos_embed`,
    `patch_embed.proj.*`, `blocks.<i>.*`) <-> `backbone/encoder/<ViT path>`
    (the `official_names` rules: `blocks.3` <-> `blocks_3`, Linear weights
    transposed, a 1-D weight is a norm `scale`); the learned `pos_embed` is a
    param;
  * other modules: the numbered path joined with '_' (`decode_head.
    psp_modules.0.1.conv.weight` <-> `decode_head/psp_modules_0_1/conv/
    kernel`, `backbone.fpn1.0` <-> `backbone/fpn1_0`);
  * Conv2d weights `(out, in, kh, kw)` <-> `(kh, kw, in, out)`; the necks'
    ConvTranspose2d weights (every 4-D weight of `backbone.fpn1.*` and
    `backbone.fpn2.*`) `(in, out, kh, kw)` <-> `(kh, kw, in, out)`;
  * BatchNorm buffers `running_mean`, `running_var`, `num_batches_tracked`
    <-> the `batch_stats` collection under the same names (the counter as
    int32; exported as int64 like torch);
  * `relative_position_index` buffers are checked against the index
    computed from the patch grid (`models.relative_position`) and dropped;
    the export writes them back, so the exported dict loads strictly in the
    official model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from mimdistill.interop.official_names import ConversionReport, leaf_to_flax, leaf_to_official
from mimdistill.models import relative_position as relpos

ROOTS = ("backbone", "decode_head", "auxiliary_head")
ENCODER_ROOTS = ("cls_token", "dist_token", "pos_embed", "patch_embed", "blocks")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_TRANSPOSED_CONV = re.compile(r"^backbone\.fpn[12]\.")


class SegmentationCheckpointError(ValueError):
  """A segmentation state dict that does not fit the mimdistill segmentor."""


def _module_path(parts: Iterable[str]) -> list[str]:
  """['psp_modules', '0', '1', 'conv'] -> ['psp_modules_0_1', 'conv']."""
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return out


def _official_parts(path: Iterable[str]) -> list[str]:
  """Inverse of `_module_path`: ['blocks_3', 'attn'] -> ['blocks', '3', 'attn']."""
  out: list[str] = []
  for p in path:
    m = re.fullmatch(r"(.+?)((?:_\d+)+)", p)
    if m:
      out.append(m.group(1))
      out.extend(m.group(2)[1:].split("_"))
    else:
      out.append(p)
  return out


def flax_path(name: str) -> tuple[str, ...]:
  """Variables path (collection first) of an official segmentor name;
  raises for names outside the layout."""
  parts = name.split(".")
  if parts[0] not in ROOTS or len(parts) < 2:
    raise SegmentationCheckpointError(
      f"{name!r} is not a segmentor name: expected a prefix in {ROOTS}"
    )
  root, rest, leaf = parts[0], parts[1:-1], parts[-1]
  collection = "batch_stats" if leaf in BN_BUFFERS else "params"
  if root == "backbone" and rest and rest[0] in ENCODER_ROOTS:
    module = ["encoder"] + _module_path(rest)
    if module[1:3] == ["patch_embed", "proj"]:
      module = ["encoder", "patch_embed"] + module[3:]
  elif root == "backbone" and not rest and leaf in ENCODER_ROOTS:
    module = ["encoder"]
  else:
    module = _module_path(rest)
  return (collection, root, *module, leaf)


def official_name(path: Iterable[str]) -> str:
  """Official name of a variables path with its collection dropped (e.g.
  `('backbone', 'encoder', 'blocks_0', 'attn', 'qkv', 'kernel')`)."""
  parts = list(path)
  root, inner, leaf = parts[0], parts[1:-1], parts[-1]
  if root == "backbone" and inner[:1] == ["encoder"]:
    inner = inner[1:]
    if inner[:1] == ["patch_embed"]:
      inner = ["patch_embed", "proj"] + inner[1:]
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join([root, *_official_parts(inner), leaf])


def _is_transposed_conv(name: str, ndim: int) -> bool:
  return ndim == 4 and bool(_TRANSPOSED_CONV.match(name))


def to_flax_leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """(Flax leaf name, value) of one official tensor."""
  leaf = name.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return leaf, np.asarray(value, np.int32)
  if leaf not in ("weight", "bias"):
    return leaf, value
  if _is_transposed_conv(name, value.ndim):
    return "kernel", value.transpose(2, 3, 0, 1)
  return leaf_to_flax(leaf, value)


def to_official_leaf(name: str, leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "num_batches_tracked":
    return np.asarray(value, np.int64)
  if leaf not in ("kernel", "scale", "bias"):
    return value
  if leaf == "kernel" and _is_transposed_conv(name, value.ndim):
    return value.transpose(2, 3, 0, 1)
  return leaf_to_official(leaf, value)[1]


def _grid_of_table(rows: int, prefix: int) -> tuple[int, int]:
  side = math.isqrt(rows - 3 * prefix)
  if side * side != rows - 3 * prefix or side % 2 == 0:
    raise SegmentationCheckpointError(
      f"a relative position table of {rows} rows fits no square patch grid with {prefix} "
      "prefix token(s)"
    )
  g = (side + 1) // 2
  return g, g


def _check_index(name: str, value: np.ndarray, prefix: int) -> str:
  n = value.shape[0]
  g = math.isqrt(n - prefix)
  expected = relpos.relative_position_index((g, g), prefix)
  if value.shape != expected.shape or not np.array_equal(value, expected):
    raise SegmentationCheckpointError(
      f"{name} differs from the BEiT relative position index of a {g}x{g} grid with "
      f"{prefix} prefix token(s); mimdistill computes the index and cannot use another"
    )
  return "buffer equal to the computed relative position index (recomputed, not stored)"


def mmcv_to_flax(
  state_dict: Mapping[str, np.ndarray],
) -> tuple[dict[str, Any], ConversionReport]:
  """`{'params': ..., 'batch_stats': ...}` of an mmcv segmentor state dict
  (`checkpoint['state_dict']`, numpy values)."""
  report = ConversionReport()
  prefix = 2 if "backbone.dist_token" in state_dict else 1
  tree: dict[str, Any] = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    if name.endswith(".relative_position_index"):
      report.skipped[name] = _check_index(name, value, prefix)
      continue
    if name.startswith("backbone.mask_token"):
      report.skipped[name] = "unused by the segmentation backbone (no masking)"
      continue
    path = flax_path(name)
    leaf, value = to_flax_leaf(name, value)
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[leaf] = value
    report.used.append(name)
  return tree, report


def _flat(tree: Mapping[str, Any]):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield [str(getattr(k, "key", k)) for k in path], leaf


def flax_to_mmcv(
  variables: Mapping[str, Any], meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """`{'meta': meta, 'state_dict': {name: numpy}}` in the mmcv layout, the
  relative position index buffers included."""
  state: dict[str, np.ndarray] = {}
  params = variables.get("params", {})
  encoder = params.get("backbone", {}).get("encoder", {})
  prefix = 2 if "dist_token" in encoder else 1
  for collection in ("params", "batch_stats"):
    for name, value in official_tensors(variables.get(collection, {})).items():
      state[name] = value
      if name.endswith(".relative_position_bias_table"):
        grid = _grid_of_table(value.shape[0], prefix)
        index_name = name.replace("relative_position_bias_table", "relative_position_index")
        state[index_name] = relpos.relative_position_index(grid, prefix).astype(np.int64)
  return {"meta": dict(meta or {}), "state_dict": state}


def official_names_of(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Official name -> leaf of a params-like tree (leaves untouched), e.g.
  for per-parameter settings or gradients keyed by `backbone.*` names."""
  return {official_name(path): leaf for path, leaf in _flat(tree)}


def official_tensors(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Official name -> official-oriented numpy value of one collection's
  tree (params, their gradients, or batch_stats)."""
  out = {}
  for path, leaf in _flat(tree):
    name = official_name(path)
    out[name] = to_official_leaf(name, path[-1], np.asarray(leaf))
  return out
