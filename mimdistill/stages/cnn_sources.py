"""Where the CNN stages' weights come from, and the check that a ViT
stage's teacher is a ViT.

A CNN init source (`init.source` of a CNN fine-tuning) is a SparK or
heterogeneous-distillation workdir (its `params/encoder`, the CNN with
timm's names), a CNN fine-tuning workdir (the classifier's params), or a
timm ResNet / official or timm ConvNeXt / SparK `.pth`
(`interop/cnn_checkpoint.import_cnn`). A teacher source of the
heterogeneous distillation must be a ViT: `check_vit_source` refuses a CNN
workdir or checkpoint with a one-line error before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from mimdistill import workdir as workdir_lib
from mimdistill.interop import cnn_names
from mimdistill.interop.cnn_checkpoint import import_state_dict
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.interop.pth_reader import load_pth
from mimdistill.paths import is_remote
from mimdistill.stages.sources import PTH_SUFFIXES, record_dir, source_kind
from mimdistill.training.cnn_layer_decay import family_of_params

PyTree = Any
CNN_HEADS = ("fc", "head", "norm")  # classifier leaves of a ResNet / ConvNeXt


def _cnn_family(tensors: dict) -> str | None:
  """'SparK', 'resnet' or 'convnext' for a CNN state dict, else None."""
  if any(n.startswith(cnn_names.SPARK_ENCODER_PREFIX) for n in tensors):
    return "SparK"
  try:
    return cnn_names.cnn_fields(tensors)["family"]
  except (ValueError, KeyError, IndexError):
    return None


def check_vit_source(source: str, what: str = "teacher.source") -> None:
  """Refuses a source that holds a CNN (workdir or .pth) where a ViT is
  needed; anything else is left to the ViT reader's own checks."""
  path = str(source)
  hint = f"{what.split('.')[0]} must be a ViT: a ViT stage's workdir or an official / timm ViT .pth"
  if path.endswith(PTH_SUFFIXES):
    if is_remote(path) or not os.path.isfile(path):
      return  # read_encoder reports it
    family = _cnn_family(load_pth(path).tensors)
    if family is not None:
      raise ValueError(f"{what}={path} is a {family} CNN checkpoint, not a ViT; {hint}")
    return
  workdir = record_dir(path)
  if not workdir.is_dir():
    return
  record = workdir_lib.signature(workdir)
  model = record.get("model") or {}
  if isinstance(model, dict) and model.get("family"):
    raise ValueError(
      f"{what}={path} is a {model['family']} workdir (stage {record.get('stage')!r}), not a "
      f"ViT; {hint}"
    )


@dataclasses.dataclass
class CNNSource:
  params: PyTree  # the CNN's params (timm-named top level), numpy
  batch_stats: PyTree | None
  fields: dict | None  # model fields read from the checkpoint (a .pth), else None
  record: dict  # lineage: kind, path / source, step


def read_cnn(source: str, *, what: str = "init.source") -> CNNSource:
  """The CNN of a source (see the module docstring)."""
  path = str(source)
  if path.endswith(PTH_SUFFIXES):
    if is_remote(path):
      raise ValueError(f"{what}={path}: copy the .pth to a local disk first and pass that path")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{what}={path} does not exist; point it at a .pth or a workdir")
    tensors = load_pth(path).tensors
    if _cnn_family(tensors) is None:
      raise ValueError(
        f"{what}={path} holds no ResNet or ConvNeXt weights (first names: "
        f"{sorted(tensors)[:5]}); a CNN fine-tuning needs a timm / SparK CNN checkpoint"
      )
    imported = import_state_dict(tensors)
    variables = imported.variables
    return CNNSource(
      variables.get("params", {}),
      variables.get("batch_stats"),
      imported.fields,
      {"kind": "pth", "path": os.path.abspath(path), "step": None},
    )
  workdir, _ = workdir_lib.parse_source(path)
  if not workdir.is_dir():
    raise FileNotFoundError(
      f"{what}={path}: no such workdir; run the SparK / heterogeneous stage there first, or "
      "point at a timm / SparK .pth"
    )
  params, record = restore_subtree(path, ("params",))  # a workdir or its best/
  prefix: tuple[str, ...] = ()
  if "encoder" in params:
    params, prefix = params["encoder"], ("encoder",)
  try:
    family_of_params(params)
  except ValueError:
    raise ValueError(
      f"{what}={path} holds no CNN (its params start with {sorted(params)[:6]}); a CNN "
      "fine-tuning starts from a SparK / heterogeneous-distillation workdir or a CNN .pth"
    ) from None
  try:
    stats, _ = restore_subtree(path, ("model_state", "batch_stats", *prefix))
  except KeyError:
    stats = None
  return CNNSource(params, stats, None, {"kind": source_kind(path), "source": path, **record})
