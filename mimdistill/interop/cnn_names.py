"""PyTorch names of the CNN families <-> mimdistill Flax variable trees.

The Flax trees (`models/resnet.py`, `models/convnext.py`, `models/spark.py`)
use the torch module names with every '.<n>' index merged into the module
name as '_<n>' (`layer1.0.downsample.1` <-> `layer1_0/downsample_1`,
`stages.2.10.dwconv` <-> `stages_2_10/dwconv`), so the map is mechanical:

  * `weight` of a Conv2d `(out, in, kh, kw)` <-> `kernel` `(kh, kw, in, out)`;
    of a ConvTranspose2d (SparK's `up_sample`) `(in, out, kh, kw)` <->
    `(kh, kw, in, out)`; of a Linear <-> `kernel` transposed; a 1-D `weight`
    (BatchNorm, LayerNorm) <-> `scale`;
  * BatchNorm `running_mean` / `running_var` <-> `batch_stats` `mean` /
    `var`; `num_batches_tracked` is not kept (the momentum-0.1 update never
    reads it) and is written back at export, so that torch's
    `load_state_dict(strict=True)` finds it;
  * SparK's `mask_tokens.<i>` `(1, C, 1, 1)` <-> `mask_tokens_<i>`
    `(1, 1, 1, C)`; ConvNeXt's `gamma` stays `gamma`.

Layouts:
  'cnn'    a plain timm ResNet / official ConvNeXt state dict (a timm
           `*.pth`, SparK's encoder-only `*_1kpretrained_timm_style.pth`,
           the raw `sparse_encoder.sp_cnn.state_dict()`), at the top of the
           tree;
  'spark'  SparK's pre-training file (`SparK.state_dict(with_config=True)`
           under `module`): `sparse_encoder.sp_cnn.<name>` <-> `encoder/...`,
           `densify_*`, `mask_tokens.*`, `dense_decoder.*` at the top; the
           deprecated `imn_m`, `imn_s`, `norm_black` buffers are skipped.

timm >= 0.6 renamed ConvNeXt (`stem.*`, `stages.<i>.downsample.*`,
`stages.<i>.blocks.<j>.conv_dw`, `mlp.fc1`, `head.norm`, `head.fc`);
`convnext_from_timm` / `convnext_to_timm` translate those names to and from
the official ones this tree uses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mimdistill.interop.official_names import ConversionReport, leaf_to_flax, leaf_to_official

LAYOUTS = ("cnn", "spark")
SPARK_ENCODER_PREFIX = "sparse_encoder.sp_cnn."
SPARK_DEPRECATED = ("imn_m", "imn_s", "norm_black")
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_TRANSPOSED_CONVS = ("up_sample",)


def _check_layout(layout: str):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown CNN layout {layout!r}; use one of {LAYOUTS}")


def _module_path(parts: list[str]) -> list[str]:
  """['layer1', '0', 'downsample', '1'] -> ['layer1_0', 'downsample_1']."""
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return out


def _torch_module(segment: str) -> str:
  """'downsample_layers_0_1' -> 'downsample_layers.0.1'."""
  return re.sub(r"_(\d+)(?=_|$)", r".\1", segment)


def torch_to_flax(
  name: str, value: np.ndarray, layout: str
) -> tuple[tuple[str, ...], np.ndarray] | str:
  """`(variables path, Flax-oriented value)` for a torch name, or a string
  saying why the tensor is not part of the tree."""
  _check_layout(layout)
  prefix: list[str] = []
  if layout == "spark":
    if name in SPARK_DEPRECATED:
      return "SparK buffer that is never used (deprecated in SparK's code)"
    if name.startswith(SPARK_ENCODER_PREFIX):
      name = name[len(SPARK_ENCODER_PREFIX) :]
      prefix = ["encoder"]
  parts = name.split(".")
  leaf = parts[-1]
  value = np.asarray(value)
  if leaf == "num_batches_tracked":
    return "BatchNorm step counter (not used by momentum updates; rewritten at export)"
  if leaf in _BN_STATS:
    return ("batch_stats", *prefix, *_module_path(parts[:-1]), _BN_STATS[leaf]), value
  if parts[0] == "mask_tokens" and len(parts) == 2:
    return ("params", *prefix, f"mask_tokens_{parts[1]}"), value.transpose(0, 2, 3, 1)
  modules = _module_path(parts[:-1])
  if leaf == "weight" and value.ndim == 4 and modules and modules[-1] in _TRANSPOSED_CONVS:
    return ("params", *prefix, *modules, "kernel"), value.transpose(2, 3, 0, 1)
  if leaf in ("weight", "bias"):
    leaf, value = leaf_to_flax(leaf, value)
  return ("params", *prefix, *modules, leaf), value


def torch_name(path: tuple[str, ...], layout: str) -> str:
  """Torch name of a variables path `(collection, *modules, leaf)`."""
  _check_layout(layout)
  collection, *parts = path
  prefix = ""
  if layout == "spark" and parts[0] == "encoder":
    prefix, parts = SPARK_ENCODER_PREFIX, parts[1:]
  leaf = parts[-1]
  modules = [_torch_module(p) for p in parts[:-1]]
  if collection == "batch_stats":
    leaf = {v: k for k, v in _BN_STATS.items()}[leaf]
  elif re.fullmatch(r"mask_tokens_\d+", leaf) and not modules:
    leaf = _torch_module(leaf)
  elif leaf in ("kernel", "scale"):
    leaf = "weight"
  return prefix + ".".join([*modules, leaf])


def flax_to_torch(path: tuple[str, ...], value: np.ndarray, layout: str) -> tuple[str, np.ndarray]:
  """Inverse of `torch_to_flax` for one leaf of a variables tree."""
  value = np.asarray(value)
  leaf = path[-1]
  if path[0] == "params":
    if re.fullmatch(r"mask_tokens_\d+", leaf):
      value = value.transpose(0, 3, 1, 2)
    elif leaf == "kernel" and value.ndim == 4 and path[-2] in _TRANSPOSED_CONVS:
      value = value.transpose(2, 3, 0, 1)
    elif leaf in ("kernel", "scale", "bias"):
      value = leaf_to_official(leaf, value)[1]
  return torch_name(path, layout), value


def to_flax(
  state_dict: Mapping[str, Any], layout: str = "cnn"
) -> tuple[dict[str, Any], ConversionReport]:
  """Flax variables `{'params', 'batch_stats'}` from a torch state dict."""
  report = ConversionReport()
  tree: dict[str, Any] = {}
  for name, value in state_dict.items():
    got = torch_to_flax(name, value, layout)
    if isinstance(got, str):
      report.skipped[name] = got
      continue
    path, value = got
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    if path[-1] in node:
      raise ValueError(f"two tensors map to {'/'.join(path)} (the second is {name!r})")
    node[path[-1]] = value
    report.used.append(name)
  return tree, report


def _leaves(variables: Mapping[str, Any]):
  for collection, tree in variables.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      yield (collection, *(str(getattr(k, "key", k)) for k in path)), leaf


def to_torch(
  variables: Mapping[str, Any], layout: str = "cnn", num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
  """Torch state dict (numpy arrays, torch orientation) of a variables tree,
  with a `num_batches_tracked` (int64 scalar) for every BatchNorm, so that
  `load_state_dict(strict=True)` accepts it. Collections other than
  `params` / `batch_stats` are not part of a torch state dict and are left
  out."""
  out: dict[str, np.ndarray] = {}
  for path, leaf in _leaves(variables):
    if path[0] not in ("params", "batch_stats"):
      continue
    name, value = flax_to_torch(path, leaf, layout)
    out[name] = np.ascontiguousarray(value)
    if name.endswith(".running_mean"):
      out[name[: -len("running_mean")] + "num_batches_tracked"] = np.asarray(
        num_batches_tracked, np.int64
      )
  return out


def named_leaves(
  tree: Mapping[str, Any], layout: str = "cnn", collection: str = "params", is_leaf=None
) -> dict[str, Any]:
  """Torch name -> leaf for a tree shaped like one collection (gradients,
  lr scales, layer ids); leaves are returned untouched (not re-oriented)."""
  return {
    torch_name((collection, *(str(getattr(k, "key", k)) for k in path)), layout): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  }


def convnext_from_timm(name: str) -> str:
  """A timm >= 0.6 ConvNeXt name as the official one (inverse of timm's
  `convnext.checkpoint_filter_fn`)."""
  name = re.sub(r"^stem\.", "downsample_layers.0.", name)
  name = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", name)
  name = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", name)
  name = name.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
  name = re.sub(r"^head\.norm\.", "norm.", name)
  return re.sub(r"^head\.fc\.", "head.", name)


def convnext_to_timm(name: str) -> str:
  """An official ConvNeXt name as timm >= 0.6 spells it."""
  name = re.sub(r"^downsample_layers\.0\.", "stem.", name)
  name = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", name)
  name = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", name)
  name = name.replace(".dwconv.", ".conv_dw.").replace(".pwconv", ".mlp.fc")
  name = re.sub(r"^head\.", "head.fc.", name)
  return re.sub(r"^norm\.", "head.norm.", name)


def is_timm_convnext(names) -> bool:
  return any(n.startswith(("stem.", "stages.0.blocks.")) for n in names)


def cnn_fields(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The model fields (for `models/cnn_zoo.build_cnn`) of a ResNet or
  ConvNeXt state dict, read from its names and shapes alone."""
  names = list(state_dict)
  if "conv1.weight" in state_dict and any(n.startswith("layer1.") for n in names):
    stem = int(np.shape(state_dict["conv1.weight"])[0])
    if 64 % stem:
      raise ValueError(f"ResNet stem width {stem} does not divide timm's 64")
    layers = tuple(
      len({n.split(".")[1] for n in names if n.startswith(f"layer{s}.")}) for s in range(1, 5)
    )
    block = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
    fields: dict[str, Any] = dict(family="resnet", block=block, layers=layers, div=64 // stem)
    if "fc.weight" in state_dict:
      fields["num_classes"] = int(np.shape(state_dict["fc.weight"])[0])
    return fields
  if is_timm_convnext(names):
    state_dict = {convnext_from_timm(n): v for n, v in state_dict.items()}
    names = list(state_dict)
  if "downsample_layers.0.0.weight" in state_dict:
    depths = tuple(
      len({n.split(".")[2] for n in names if n.startswith(f"stages.{i}.")}) for i in range(4)
    )
    dims = tuple(int(np.shape(state_dict[f"stages.{i}.0.dwconv.weight"])[0]) for i in range(4))
    fields = dict(family="convnext", depths=depths, dims=dims)
    if "head.weight" in state_dict:
      fields["num_classes"] = int(np.shape(state_dict["head.weight"])[0])
    if "stages.0.0.gamma" not in state_dict:
      fields["layer_scale_init_value"] = 0.0
    return fields
  raise ValueError(
    "not a timm ResNet or ConvNeXt state dict (no conv1.weight + layer1.*, no "
    f"downsample_layers.0.0.weight or stem.0.weight); first names: {names[:5]}"
  )
