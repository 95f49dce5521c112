"""Official CAE v2 (`ContextAutoencoderViT`) names <-> `models.cae.CAEv2`
variables `{'params', 'fixed'}`.

  encoder.<vit name>         params/encoder/<as official_names 'vit'>
                             (encoder.pos_embed -> fixed/encoder/pos_embed)
  rd_pos_embed               fixed/rd_pos_embed
  mask_token                 params/mask_token
  encoder_to_regresser(_norm).weight|bias, decoder.norm|head.weight|bias,
  regresser.norm.weight|bias,
  regresser.regressor_blocks.<i>.<module>.weight|bias
                             params/.../regressor_blocks_<i>/.../kernel|scale|bias
                             (Linear kernels transposed)
  ...gamma_1_cross, q_bias   same leaf names (fixed/... for the unit gammas of a
                             regressor built with layer scale 0)

The CAE v1 parts (`alignment_encoder.*`, `teacher.*`, a decoder with
blocks) are not part of CAE v2 and are reported as skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mimdistill.interop.official_names import (
  ConversionReport,
  leaf_to_flax,
  official_name,
  official_path,
  to_official_leaf,
)

_FIXED = {"rd_pos_embed"}
_SKIP = (
  (re.compile(r"^alignment_encoder\."), "CAE v1 alignment encoder, not part of CAE v2"),
  (re.compile(r"^teacher\."), "a teacher copy, never part of the student"),
  (re.compile(r"^decoder\.decoder_blocks\."), "CAE v1 decoder blocks (CAE v2 has decoder_depth 0)"),
)


def _module_path(parts: list[str]) -> list[str]:
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return out


def cae_path(name: str, *, fixed_gammas: bool = False) -> tuple[str, ...] | str:
  """Variables path (leaf still 'weight'/'bias') of an official name, or
  why it is skipped. `fixed_gammas`: the regressor has unit, frozen gammas."""
  for pattern, why in _SKIP:
    if pattern.search(name):
      return why
  if name.startswith("encoder."):
    path = official_path(name[len("encoder.") :], "vit")
    if isinstance(path, str):
      return path
    return (path[0], "encoder", *path[1:])
  if name in _FIXED:
    return ("fixed", name)
  parts = _module_path(name.split("."))
  collection = "params"
  if fixed_gammas and parts[-1] in ("gamma_1_cross", "gamma_2_cross"):
    collection = "fixed"
  return (collection, *parts)


def cae_to_flax(
  state_dict: Mapping[str, Any], *, fixed_gammas: bool = False
) -> tuple[dict[str, Any], ConversionReport]:
  """Flax variables `{'params', 'fixed'}` (float32 numpy) from an official
  CAE v2 state dict."""
  report = ConversionReport()
  tree: dict[str, Any] = {}
  for name, value in state_dict.items():
    path = cae_path(name, fixed_gammas=fixed_gammas)
    if isinstance(path, str):
      report.skipped[name] = path
      continue
    value = np.asarray(value, np.float32)
    if path[-1] in ("weight", "bias"):
      leaf, value = leaf_to_flax(path[-1], value)
      path = (*path[:-1], leaf)
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    report.used.append(name)
  return tree, report


def cae_name(path: tuple[str, ...] | list[str]) -> str:
  """Official name of a Flax variable path (collection excluded)."""
  parts = list(path)
  if parts[0] == "encoder":
    return "encoder." + official_name(parts[1:], "vit")
  leaf = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  parts = parts[:-1] + [leaf]
  return ".".join(
    re.sub(r"_(\d+)$", r".\1", p) if p.startswith("regressor_blocks_") else p for p in parts
  )


def flax_to_cae(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Official name -> official-oriented numpy value for every leaf of every
  collection (a params-only tree, e.g. gradients, works too)."""
  import jax

  out: dict[str, np.ndarray] = {}
  for tree in variables.values():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = [str(getattr(k, "key", k)) for k in path]
      out[cae_name(keys)] = to_official_leaf(keys[-1], np.asarray(leaf))
  return out
