"""Import and export of CNN checkpoints (timm ResNet, official or timm
ConvNeXt, SparK's pre-training and encoder-only files), torch-free.

`import_cnn(path)` reads any of:
  * a timm / official state dict, raw or under 'model' / 'state_dict'
    (`load_pth` finds it), including SparK's encoder-only
    `*_1kpretrained_timm_style.pth`;
  * SparK's `*_withdecoder_1kpretrained_spark_style.pth` (weights under
    'module' plus a non-tensor 'config' entry): its encoder
    (`sparse_encoder.sp_cnn.*`) is taken; `part='spark'` keeps the whole
    SparK tree (densify, mask tokens, decoder) instead;
and returns the model fields (for `models/cnn_zoo.build_cnn`, read from the
names and shapes), the Flax variables and what was skipped.

`export_cnn(variables, family)` gives the torch state dict (numpy) with
timm's ResNet names, or ConvNeXt's official names (`convnext_names='timm'`
for timm >= 0.5's), a `num_batches_tracked` per BatchNorm, so that
`model.load_state_dict(sd, strict=True)` accepts it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mimdistill.interop import cnn_names
from mimdistill.interop.official_names import ConversionReport
from mimdistill.interop.pth_reader import load_pth

PARTS = ("encoder", "spark")


@dataclasses.dataclass
class CNNImport:
  fields: dict[str, Any]  # model fields of the (encoder) CNN
  variables: dict[str, Any]  # {'params', 'batch_stats'}
  report: ConversionReport
  source: str  # 'spark' (pre-training file) or 'cnn' (plain state dict)


def import_state_dict(tensors: dict[str, np.ndarray], part: str = "encoder") -> CNNImport:
  if part not in PARTS:
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")
  prefix = cnn_names.SPARK_ENCODER_PREFIX
  is_spark = any(n.startswith(prefix) for n in tensors)
  if part == "spark":
    if not is_spark:
      raise ValueError("part='spark' needs SparK's pre-training file (sparse_encoder.sp_cnn.*)")
    encoder = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
    variables, report = cnn_names.to_flax(tensors, "spark")
    return CNNImport(cnn_names.cnn_fields(encoder), variables, report, "spark")
  report = ConversionReport()
  if is_spark:
    for n in tensors:
      if not n.startswith(prefix):
        report.skipped[n] = "SparK pre-training only (densify / mask tokens / decoder)"
    tensors = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
  if cnn_names.is_timm_convnext(tensors):
    tensors = {cnn_names.convnext_from_timm(n): v for n, v in tensors.items()}
  fields = cnn_names.cnn_fields(tensors)
  variables, conversion = cnn_names.to_flax(tensors, "cnn")
  report.used += conversion.used
  report.skipped.update(conversion.skipped)
  return CNNImport(fields, variables, report, "spark" if is_spark else "cnn")


def import_cnn(path, part: str = "encoder") -> CNNImport:
  """See the module docstring."""
  return import_state_dict(load_pth(path).tensors, part)


def export_cnn(
  variables: dict[str, Any],
  family: str,
  convnext_names: str = "official",
  num_batches_tracked: int = 0,
) -> dict[str, np.ndarray]:
  """Torch state dict of a ResNet / ConvNeXt variables tree (the encoder's
  own tree, not SparK's: pass `variables['params']['encoder']`-style
  subtrees as `{'params': ..., 'batch_stats': ...}`)."""
  if convnext_names not in ("official", "timm"):
    raise ValueError(f"convnext_names must be 'official' or 'timm', got {convnext_names!r}")
  state = cnn_names.to_torch(variables, "cnn", num_batches_tracked=num_batches_tracked)
  if family == "convnext" and convnext_names == "timm":
    state = {cnn_names.convnext_to_timm(n): v for n, v in state.items()}
  return state
