"""Official PyTorch parameter names <-> mimdistill Flax param trees.

The Flax trees use the official module names (see `models/vit.py`), so the
mapping is mechanical:
  * `blocks.3.attn.qkv.weight` <-> `blocks_3/attn/qkv/kernel` (transposed);
  * a 1-D `weight` is a LayerNorm `scale`;
  * `patch_embed.proj.weight` `(D, C, p, p)` <-> `patch_embed/kernel`
    `(p, p, C, D)`;
  * MAE decoder names lose their `decoder_` prefix inside the `decoder`
    subtree;
  * fixed sin-cos embeddings (`pos_embed` of pre-training models,
    `decoder_pos_embed`: `requires_grad=False` in the official code) go to
    the `fixed` collection, never to `params`; a learnable `pos_embed`
    (fine-tuning) is a param.

Trees here are Flax *variables*: `{'params': ..., 'fixed': ...}`.

Layouts (where the encoder lives in the tree):
  'vit'        encoder params at the top level (teachers, students);
  'mae'        `{'encoder': ..., 'decoder': ...}`;
  'classifier' `{'encoder': ..., 'fc_norm': ..., 'head': ...}`, plus DeiT's
               `head_dist` and TinyMIM*-T's extra layer `conv1x1_0`,
               `conv1x1_1` (`conv1x1.0`, `conv1x1.1`) when the model has them.

DeiT's `dist_token` is an encoder param like `cls_token`. Layer scale has
BEiT's names (`blocks.<i>.gamma_1`, `gamma_2`, what TinyMIM's backbones
use); timm's `blocks.<i>.ls1.gamma` / `ls2.gamma` are read as those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

LAYOUTS = ("vit", "mae", "classifier")
_DECODER_RENAMES = {
  "decoder_embed": "embed",
  "decoder_norm": "norm",
  "decoder_pred": "pred",
  "decoder_blocks": "blocks",
  "mask_token": "mask_token",
}
_HEAD_MODULES = ("fc_norm", "head", "head_dist", "conv1x1")
# timm's layer-scale names -> BEiT's (`blocks.3.ls1.gamma` -> `blocks.3.gamma_1`).
_TIMM_LAYER_SCALE = re.compile(r"^(blocks\.\d+)\.ls([12])\.gamma$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


@dataclass
class ConversionReport:
  used: list[str] = field(default_factory=list)
  skipped: dict[str, str] = field(default_factory=dict)  # name -> why

  def __str__(self) -> str:
    lines = [f"{len(self.used)} tensors used"]
    for name, why in self.skipped.items():
      lines.append(f"  skipped {name}: {why}")
    return "\n".join(lines)


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


def _module_path(parts: list[str]) -> list[str]:
  """['blocks', '3', 'attn', 'qkv'] -> ['blocks_3', 'attn', 'qkv']."""
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  if out[:2] == ["patch_embed", "proj"]:
    out = ["patch_embed"] + out[2:]
  return out


def leaf_to_flax(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """A torch `weight`/`bias` leaf as its Flax name and orientation: a 1-D
  weight is a norm `scale`, a Linear weight is transposed, a Conv2d weight
  `(out, in, kh, kw)` becomes `(kh, kw, in, out)`."""
  if leaf == "bias":
    return "bias", value
  if leaf == "weight":
    if value.ndim == 1:
      return "scale", value
    if value.ndim == 2:
      return "kernel", value.T
    if value.ndim == 4:
      return "kernel", value.transpose(2, 3, 1, 0)
  raise ValueError(f"cannot convert parameter leaf {leaf!r} of shape {value.shape}")


def leaf_to_official(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Inverse of `leaf_to_flax`."""
  if leaf == "bias":
    return "bias", value
  if leaf == "scale":
    return "weight", value
  if leaf == "kernel":
    if value.ndim == 2:
      return "weight", value.T
    if value.ndim == 4:
      return "weight", value.transpose(3, 2, 0, 1)
  raise ValueError(f"cannot convert Flax leaf {leaf!r} of shape {value.shape}")


def canonical_name(name: str) -> str:
  """The project's official name of a tensor another codebase names
  differently (timm's layer scale)."""
  return _TIMM_LAYER_SCALE.sub(r"\1.gamma_\2", name)


def official_path(
  name: str, layout: str, *, learned_pos_embed: bool = False
) -> tuple[str, ...] | str:
  """Variables path for an official name, or a string saying why it is skipped."""
  _check_layout(layout)
  name = canonical_name(name)
  parts = name.split(".")
  root = parts[0]
  collection = "params"
  if name == "pos_embed" and not learned_pos_embed:
    collection = "fixed"
  if name == "decoder_pos_embed":
    if layout != "mae":
      return f"MAE decoder buffer, not used by the '{layout}' layout"
    return ("fixed", "decoder", "pos_embed")
  if root in _DECODER_RENAMES:
    if layout != "mae":
      return f"MAE decoder weight, not used by the '{layout}' layout"
    path = _module_path([_DECODER_RENAMES[root]] + parts[1:])
    return (collection, "decoder", *path)
  if root in _HEAD_MODULES:
    if layout != "classifier":
      return f"classifier weight, not used by the '{layout}' layout"
    return (collection, *_module_path(parts))
  path = tuple(_module_path(parts))
  return (collection, *path) if layout == "vit" else (collection, "encoder", *path)


def iter_official_to_flax(
  state_dict: Mapping[str, np.ndarray] | Iterable[tuple[str, Any]],
  layout: str,
  *,
  learned_pos_embed: bool = False,
) -> Iterator[tuple[str, tuple[str, ...] | str, Any]]:
  """One tensor at a time: `(name, variables path, Flax-oriented value)`, or
  `(name, why it is skipped, None)`.

  Values are numpy views of the inputs (a transposed view for kernels), so a
  caller converting a large checkpoint decides when to copy and can release
  each source tensor before the next. `state_dict` may also be an iterable
  of `(name, value)` pairs (e.g. a generator that pops a dict).
  """
  pairs = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
  for name, value in pairs:
    path = official_path(name, layout, learned_pos_embed=learned_pos_embed)
    if isinstance(path, str):
      yield name, path, None
      continue
    value = np.asarray(value)
    if path[-1] in ("weight", "bias"):
      leaf, value = leaf_to_flax(path[-1], value)
      path = (*path[:-1], leaf)
    yield name, path, value


def official_to_flax(
  state_dict: Mapping[str, np.ndarray], layout: str, *, learned_pos_embed: bool = False
) -> tuple[dict[str, Any], ConversionReport]:
  """Builds Flax variables `{'params', 'fixed'}` from an official state dict."""
  report = ConversionReport()
  tree: dict[str, Any] = {}
  for name, path, value in iter_official_to_flax(
    state_dict, layout, learned_pos_embed=learned_pos_embed
  ):
    if isinstance(path, str):
      report.skipped[name] = path
      continue
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    report.used.append(name)
  return tree, report


def official_name(path: Sequence[str], layout: str) -> str:
  """Official name of a Flax variable path (collection name excluded)."""
  _check_layout(layout)
  inverse_decoder = {v: k for k, v in _DECODER_RENAMES.items()}
  parts = list(path)
  if layout in ("mae", "classifier") and parts[0] == "encoder":
    parts = parts[1:]
  elif layout == "mae" and parts[0] == "decoder":
    parts = parts[1:]
    if parts == ["pos_embed"]:
      parts = ["decoder_pos_embed"]
    else:
      head = re.sub(r"_\d+$", "", parts[0])
      parts[0] = parts[0].replace(head, inverse_decoder[head], 1)
  parts[-1] = _LEAF_NAMES.get(parts[-1], parts[-1])
  if parts[0] == "patch_embed":
    parts = ["patch_embed", "proj"] + parts[1:]
  # Only module names carry a list index (`blocks_3`); a leaf such as
  # `gamma_1` (BEiT layer scale) keeps its underscore.
  return ".".join([re.sub(r"_(\d+)$", r".\1", p) for p in parts[:-1]] + parts[-1:])


def _flat(variables: Mapping[str, Any]):
  for tree in variables.values():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      yield [str(getattr(k, "key", k)) for k in path], leaf


def official_names_of(variables: Mapping[str, Any], layout: str) -> dict[str, Any]:
  """Official name -> leaf, leaves untouched (for trees of per-param settings)."""
  return {official_name(path, layout): leaf for path, leaf in _flat(variables)}


def iter_flax_to_official(
  variables: Mapping[str, Any], layout: str
) -> Iterator[tuple[str, np.ndarray]]:
  """One leaf at a time: `(official name, official-oriented value)`; kernels
  come back as transposed numpy views of the leaves."""
  for path, leaf in _flat(variables):
    yield official_name(path, layout), to_official_leaf(path[-1], np.asarray(leaf))


def to_official_leaf(leaf: str, value: np.ndarray) -> np.ndarray:
  """A Flax leaf named `leaf` ('kernel', 'scale', 'bias', 'pos_embed', ...)
  in the official orientation (a view: kernels are transposed, not copied)."""
  return leaf_to_official(leaf, value)[1] if leaf in _LEAF_NAMES else value


def flax_to_official(variables: Mapping[str, Any], layout: str) -> dict[str, np.ndarray]:
  """Inverse of `official_to_flax`: every leaf of every collection."""
  return dict(iter_flax_to_official(variables, layout))
