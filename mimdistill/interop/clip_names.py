"""CLIP image-tower names (OpenAI `visual.*`, open_clip) <-> the Flax tree of
`models.clip.ClipVisual`.

Layouts read:
  'openai'     a full OpenAI CLIP state dict (the released `.pt` files, read
               by `torchscript_reader`, or `model.state_dict()` saved with
               torch.save): `visual.*` plus the text tower and the int
               entries `input_resolution` / `context_length` / `vocab_size`;
  'open_clip'  open_clip's native `VisionTransformer` under `visual.`: the
               same names, optionally layer scale (`ls_1.gamma`,
               `ls_2.gamma`) and no `ln_pre`; its text tower as `text.*` or
               OpenAI-style; training checkpoints keep it under
               `state_dict` with DistributedDataParallel's `module.` prefix
               (`pth_reader.load_pth` strips both);
  'visual'     the tower's own state dict (`model.visual.state_dict()`),
               names without the `visual.` prefix.

Anything else (open_clip's timm towers `visual.trunk.*`, CLIP's ModifiedResNet
`visual.layer1.*` / `visual.attnpool.*`, attentional poolers, the custom
blocks' extra norms and scales, separate q/k/v projection weights) is refused
with a one-line error naming what was found.

Name rules (`<i>` a block index):
  conv1.weight (W, 3, p, p)              conv1/kernel (p, p, 3, W)
  class_embedding, positional_embedding, proj       same name, same layout
  ln_pre|ln_post.weight|bias             ln_pre|ln_post/scale|bias
  transformer.resblocks.<i>.ln_1.weight  transformer/resblocks_<i>/ln_1/scale
  ...attn.in_proj_weight (3W, W)         .../attn/in_proj/kernel (W, 3W)
  ...attn.in_proj_bias                   .../attn/in_proj/bias
  ...attn.out_proj|mlp.c_fc|mlp.c_proj.weight|bias   .../kernel (transposed)|bias
  ...ls_1|ls_2.gamma                     .../ls_1|ls_2/gamma
Every value is upcast to float32 (the released files mix float16 and
float32; `clip.modeling_clip.load` runs `model.float()` on CPU).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mimdistill.interop.official_names import ConversionReport, leaf_to_flax, leaf_to_official
from mimdistill.interop.torchscript_reader import read_torch_file

LAYOUTS = ("openai", "open_clip", "visual")
PREFIX = "visual."

# OpenAI's build_model: heads = width // 64 (ViT-B/16: 768 -> 12).
HEAD_WIDTH = 64

_BLOCK_LEAVES = {
  "ln_1.weight",
  "ln_1.bias",
  "attn.in_proj_weight",
  "attn.in_proj_bias",
  "attn.out_proj.weight",
  "attn.out_proj.bias",
  "ln_2.weight",
  "ln_2.bias",
  "mlp.c_fc.weight",
  "mlp.c_fc.bias",
  "mlp.c_proj.weight",
  "mlp.c_proj.bias",
  "ls_1.gamma",
  "ls_2.gamma",
}
_TOP_LEAVES = {
  "conv1.weight",
  "class_embedding",
  "positional_embedding",
  "ln_pre.weight",
  "ln_pre.bias",
  "ln_post.weight",
  "ln_post.bias",
  "proj",
}
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")

# What a known unsupported tower looks like, checked in order.
_UNSUPPORTED = (
  (re.compile(r"^trunk\."), "an open_clip timm tower (visual.trunk.*)"),
  (re.compile(r"^(layer[1-4]\.|attnpool\.|bn1\.)"), "CLIP's ModifiedResNet (visual.layer*.*)"),
  (re.compile(r"^attn_pool"), "an attentional pooler (visual.attn_pool*)"),
  (re.compile(r"\.(ln_inner|ln_attn|ln_q|ln_k)\.|\.mlp\.ln\."), "open_clip custom-block norms"),
  (re.compile(r"\.(logit_scale|head_scale)$"), "open_clip scaled-cosine / head-scale attention"),
  (re.compile(r"\.(q|k|v)_proj_weight$"), "separate q/k/v projection weights"),
  (re.compile(r"^head\."), "a classification head on the tower"),
)


class UnsupportedClipLayout(ValueError):
  """The tensors are not a CLIP ViT image tower this importer knows."""


@dataclasses.dataclass(frozen=True)
class ClipVisualSpec:
  """The tower's architecture as its weights tell it (`heads` excepted)."""

  width: int
  layers: int
  heads: int
  patch_size: int
  image_size: int
  output_dim: int
  mlp_ratio: float = 4.0
  layer_scale: bool = False
  pre_norm: bool = True

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def module_kwargs(self, **overrides) -> dict[str, Any]:
    """Fields of `models.clip.ClipVisual` (layer scale as its init value 1.0:
    the checkpoint's gammas replace it)."""
    kw = dataclasses.asdict(self)
    kw["layer_scale"] = 1.0 if self.layer_scale else None
    kw.update(overrides)
    return kw


def _preview(names, limit: int = 5) -> str:
  names = sorted(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def split_visual(tensors: Mapping[str, Any], *, what: str = "state dict") -> tuple[str, dict, dict]:
  """(layout, the tower's tensors without prefix, the other tensors)."""
  names = list(tensors)
  visual = {n[len(PREFIX) :]: tensors[n] for n in names if n.startswith(PREFIX)}
  if visual:
    rest = {n: tensors[n] for n in names if not n.startswith(PREFIX)}
    text_open_clip = any(n.startswith("text.") for n in rest)
    custom = (
      any(re.search(r"\.ls_[12]\.gamma$", n) for n in visual) or "ln_pre.weight" not in visual
    )
    layout = "open_clip" if text_open_clip or custom else "openai"
    return layout, visual, rest
  if "conv1.weight" in tensors:
    return "visual", dict(tensors), {}
  raise UnsupportedClipLayout(
    f"{what}: no CLIP image tower found: no 'visual.*' names and no bare 'conv1.weight' "
    f"(found {_preview(names)}); expected an OpenAI / open_clip CLIP state dict"
  )


def check_supported(visual: Mapping[str, Any], *, what: str = "state dict") -> None:
  """Raises UnsupportedClipLayout (one line) unless `visual` is a ViT tower."""
  for pattern, description in _UNSUPPORTED:
    found = [n for n in visual if pattern.search(n)]
    if found:
      raise UnsupportedClipLayout(
        f"{what}: unsupported CLIP visual layout: found {description} "
        f"({_preview(PREFIX + n for n in found)}); supported: the OpenAI / open_clip "
        "VisionTransformer (visual.conv1, visual.transformer.resblocks.*, visual.proj)"
      )
  unknown = [
    n
    for n in visual
    if n not in _TOP_LEAVES and not (_BLOCK.match(n) and _BLOCK.match(n).group(2) in _BLOCK_LEAVES)
  ]
  missing = [
    n
    for n in ("conv1.weight", "class_embedding", "positional_embedding", "proj")
    if n not in visual
  ]
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f"unknown tensors {_preview(PREFIX + n for n in unknown)}")
    if missing:
      parts.append(f"missing {_preview(PREFIX + n for n in missing)}")
    raise UnsupportedClipLayout(
      f"{what}: unsupported CLIP visual layout: {'; '.join(parts)}; supported: the OpenAI / "
      "open_clip VisionTransformer"
    )


def infer_spec(visual: Mapping[str, Any], *, heads: int | None = None) -> ClipVisualSpec:
  """Architecture from the shapes, as OpenAI's `build_model` reads it."""
  conv = np.shape(visual["conv1.weight"])
  width, patch = int(conv[0]), int(conv[-1])
  blocks = sorted({int(_BLOCK.match(n).group(1)) for n in visual if _BLOCK.match(n)})
  if blocks != list(range(len(blocks))):
    raise UnsupportedClipLayout(f"CLIP tower blocks are not numbered 0..n-1: found {blocks}")
  rows = int(np.shape(visual["positional_embedding"])[0]) - 1
  grid = math.isqrt(rows)
  if grid * grid != rows:
    raise UnsupportedClipLayout(
      f"visual.positional_embedding has {rows} patch rows, not a square grid"
    )
  hidden = np.shape(visual["transformer.resblocks.0.mlp.c_fc.weight"])[0] if blocks else 4 * width
  heads = heads or max(1, width // HEAD_WIDTH)
  if width % heads:
    raise ValueError(f"CLIP width {width} is not divisible by heads={heads}")
  return ClipVisualSpec(
    width=width,
    layers=len(blocks),
    heads=int(heads),
    patch_size=patch,
    image_size=patch * grid,
    output_dim=int(np.shape(visual["proj"])[1]),
    mlp_ratio=float(hidden) / width,
    layer_scale="transformer.resblocks.0.ls_1.gamma" in visual,
    pre_norm="ln_pre.weight" in visual,
  )


def flax_path(name: str) -> tuple[str, ...]:
  """Flax params path of a tower name (without `visual.`), leaf included."""
  parts = name.split(".")
  path: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and path:
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p)
  leaf = parts[-1]
  if leaf == "in_proj_weight":
    return (*path, "in_proj", "kernel")
  if leaf == "in_proj_bias":
    return (*path, "in_proj", "bias")
  return (*path, leaf)


def clip_visual_to_flax(
  tensors: Mapping[str, Any], *, heads: int | None = None, what: str = "state dict"
) -> tuple[dict, ClipVisualSpec, ConversionReport, str]:
  """(ClipVisual params, spec, report, layout) from a CLIP state dict."""
  layout, visual, rest = split_visual(tensors, what=what)
  check_supported(visual, what=what)
  spec = infer_spec(visual, heads=heads)
  report = ConversionReport()
  params: dict[str, Any] = {}
  for name, value in visual.items():
    value = np.asarray(value, np.float32)
    path = flax_path(name)
    if path[-2:] == ("in_proj", "kernel"):
      value = value.T
    elif path[-1] in ("weight", "bias"):
      leaf, value = leaf_to_flax(path[-1], value)
      path = (*path[:-1], leaf)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    report.used.append(PREFIX + name if layout != "visual" else name)
  for name in rest:
    report.skipped[name] = "not part of the CLIP image tower"
  return params, spec, report, layout


def flax_to_clip_visual(params: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """Inverse of `clip_visual_to_flax` (float32 values, OpenAI names)."""
  out: dict[str, np.ndarray] = {}

  def walk(node, path):
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, (*path, key))
        continue
      value = np.asarray(value)
      parts = [re.sub(r"^resblocks_(\d+)$", r"resblocks.\1", p) for p in path]
      if path and path[-1] == "in_proj":
        parts = parts[:-1] + ["in_proj_weight" if key == "kernel" else "in_proj_bias"]
        value = value.T if key == "kernel" else value
      elif key in ("kernel", "scale", "bias"):
        leaf, value = leaf_to_official(key, value)
        parts.append(leaf)
      else:
        parts.append(key)
      out[prefix + ".".join(parts)] = value

  walk(params, ())
  return out


def read_clip_visual(
  path, *, heads: int | None = None
) -> tuple[dict, ClipVisualSpec, ConversionReport, str]:
  """(ClipVisual params, spec, report, layout) from a file, nothing in it run:
  OpenAI's released TorchScript `.pt`, or a torch.save state dict (OpenAI,
  open_clip including its training checkpoints, or the bare tower). For
  another input resolution resize `positional_embedding` with
  `models.clip.resize_positional_embedding`, as the official
  `clip.modeling_clip.load(..., image_resolution=...)` does."""
  ckpt = read_torch_file(path)
  return clip_visual_to_flax(ckpt.tensors, heads=heads, what=str(path))
