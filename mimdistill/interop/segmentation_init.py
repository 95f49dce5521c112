"""A plain ViT encoder (MAE / TinyMIM / timm names, a mimdistill workdir:
anything `stages.sources.read_encoder` reads) as the initialisation
of the segmentation backbone, as TinyMIM's `mmcv_custom/checkpoint.py
load_checkpoint(strict=False)` does it:

  * the absolute position embedding is resized to the crop's patch grid
    (bicubic, `models.pos_embed.resize_pos_embed`, the prefix rows kept); a
    fixed sin-cos one (pre-training checkpoints) becomes the learned one;
  * parts the encoder has no weights for keep the backbone's
    initialisation and are reported: relative position tables (zeros, as
    BEiT initialises them), layer scales `gamma_1`/`gamma_2` (their init
    value, 1.0 in TinyMIM's configs), TinyMIM*-T's `dist_token`, and the
    necks (always new); TinyMIM*-T's `conv1x1` comes from the encoder when
    it has one;
  * encoder weights the backbone does not use (final `norm`, `fc_norm`,
    `head`, ...) are reported as skipped.

Refused, with the reason: a block or tensor of another shape (another
width or depth), relative position tables of another size (the official
loader's geometric interpolation of tables is not implemented), another
number of prefix tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mimdistill.models.pos_embed import resize_pos_embed

PyTree = Any
KEPT_INIT = {
  "relative_position_bias_table": "zero-initialised (the encoder has no relative position bias)",
  "gamma_1": "initialised to the layer-scale init value (the encoder has no layer scale)",
  "gamma_2": "initialised to the layer-scale init value (the encoder has no layer scale)",
  "dist_token": "newly initialised (the encoder has no distillation token)",
}


@dataclasses.dataclass
class BackboneInitReport:
  loaded: list[str] = dataclasses.field(default_factory=list)
  initialised: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # source path -> why
  resized: dict[str, str] = dataclasses.field(default_factory=dict)

  def __str__(self) -> str:
    lines = [f"{len(self.loaded)} encoder tensors loaded"]
    lines += [f"  resized {k}: {v}" for k, v in self.resized.items()]
    # One line per reason (a 24-block backbone would list every block).
    for verb, entries in (("initialised", self.initialised), ("skipped", self.skipped)):
      by_reason: dict[str, list[str]] = {}
      for path, why in entries.items():
        by_reason.setdefault(why, []).append(path)
      for why, paths in by_reason.items():
        shown = paths[0] if len(paths) == 1 else f"{len(paths)} tensors ({paths[0]}, ...)"
        lines.append(f"  {verb} {shown}: {why}")
    return "\n".join(lines)


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def init_backbone(
  template: Mapping[str, Any],
  encoder: Mapping[str, Any],
  encoder_fixed: Mapping[str, Any] | None = None,
  *,
  num_prefix_tokens: int = 1,
  only_loaded: bool = False,
) -> tuple[dict[str, Any], BackboneInitReport]:
  """Backbone params (the `backbone` subtree of a segmentor's params) with
  `encoder` (a ViTEncoder params tree, numpy) loaded into `template` (the
  freshly initialised backbone params). With `only_loaded`, the result
  holds the loaded leaves only (the rest keeps whatever init the caller
  has), and `template` may be abstract (`jax.eval_shape` leaves)."""
  report = BackboneInitReport()
  source = {f"encoder/{k}": np.asarray(v) for k, v in _flat(encoder).items()}
  for key, value in _flat(encoder_fixed or {}).items():
    source.setdefault(f"encoder/{key}", np.asarray(value))
  # A TinyMIM*-T encoder keeps its extra layer next to the blocks.
  for key in [k for k in source if k.startswith("encoder/conv1x1_")]:
    source[key[len("encoder/") :]] = source.pop(key)
  out = {}
  for path, init in _flat(template).items():
    if not only_loaded:
      init = np.asarray(init)
    leaf = path.rsplit("/", 1)[-1]
    if path not in source:
      if path.startswith("encoder/") and leaf not in KEPT_INIT:
        raise ValueError(
          f"the encoder has no {path[len('encoder/') :]!r} (shape {tuple(init.shape)}): it does "
          "not match the backbone (another depth, or not a ViT encoder)"
        )
      if not only_loaded:
        out[path] = init
      if path.startswith("encoder/"):
        report.initialised[path] = KEPT_INIT[leaf]
      continue
    value = source.pop(path)
    if leaf == "pos_embed" and value.shape != tuple(init.shape):
      grid = math.isqrt(init.shape[1] - num_prefix_tokens)
      old = value.shape
      side = math.isqrt(max(value.shape[1] - num_prefix_tokens, 0))
      if side * side != value.shape[1] - num_prefix_tokens:
        raise ValueError(
          f"encoder pos_embed {old} does not fit {num_prefix_tokens} prefix token(s) and a "
          f"square patch grid; the backbone needs {init.shape}"
        )
      value = resize_pos_embed(value, grid, num_prefix_tokens)
      report.resized[path] = f"{old} -> {value.shape} (bicubic)"
    if value.shape != tuple(init.shape):
      why = (
        "relative position tables of another size are not interpolated (the official "
        "loader's geometric-progression resize is not implemented)"
        if leaf == "relative_position_bias_table"
        else "another width, head count or patch size"
      )
      raise ValueError(
        f"encoder {path} has shape {value.shape}, the backbone needs {init.shape}: {why}"
      )
    out[path] = value.astype(np.dtype(init.dtype))
    report.loaded.append(path)
  for path in source:
    report.skipped[path] = "not part of the segmentation backbone"
  for path in _flat(template):
    if not path.startswith("encoder/") and path not in report.loaded:
      report.initialised.setdefault(path, "new (segmentation neck / extra layer)")
  return _unflat(out), report
