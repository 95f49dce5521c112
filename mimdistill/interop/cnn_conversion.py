"""A CNN workdir to a torch state dict file with timm's names.

    python -m mimdistill.convert W/finetune resnet50.safetensors   # or .pth

The source is a workdir holding a ResNet / ConvNeXt: CNN fine-tuning (the
whole classifier), SparK pre-training or heterogeneous distillation (the
encoder; its decoder and projection are pre-training only and are left
out, as SparK's own `*_timm_style.pth` files do). The file loads with
`model.load_state_dict(sd, strict=True)` into timm's `resnet*` /
`convnext_*` (ConvNeXt in timm's names; a fine-tuned classifier with its
`fc` / `head.fc`, an encoder without it: `timm.create_model(...,
num_classes=0)`). A CNN `.pth` is read directly by every CNN stage
(`init.source=...`), so the other direction needs no conversion.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from mimdistill import workdir as workdir_lib
from mimdistill.interop.cnn_checkpoint import export_cnn
from mimdistill.interop.orbax_tree import holds_checkpoints, restore_subtree, saved_state


@dataclasses.dataclass
class CNNExportReport:
  src: str
  dst: str
  family: str
  part: str  # 'classifier' | 'encoder'
  names: list[str]

  def __str__(self) -> str:
    return "\n".join(
      [
        f"source      {self.src} (workdir)",
        f"detected    {self.family} {self.part}",
        f"wrote       {self.dst}: {len(self.names)} tensors with timm's names",
      ]
    )

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _family(params) -> str | None:
  top = set(params)
  if "conv1" in top and any(k.startswith("layer1_") for k in top):
    return "resnet"
  if any(k.startswith("downsample_layers_") for k in top):
    return "convnext"
  return None


def _params_root(src: str):
  """(CNN params root path, family) of a workdir or its best/, or None if it
  holds no CNN."""
  path, _ = workdir_lib.parse_source(src)
  if not holds_checkpoints(path):
    return None
  try:
    params = saved_state(src).tree.get("params") or {}
  except (FileNotFoundError, AttributeError):
    return None
  for root in ((), ("encoder",)):
    node = params
    for key in root:
      node = node.get(key, {}) if isinstance(node, dict) else {}
    family = _family(node) if isinstance(node, dict) else None
    if family:
      return root, family
  return None


def handles(src) -> bool:
  """Whether SRC is a local workdir holding a CNN."""
  src = os.fspath(src)
  return workdir_lib.parse_source(src)[0].is_dir() and _params_root(src) is not None


def convert(src, dst, *, overwrite: bool = False, log=None) -> CNNExportReport:
  from mimdistill.interop.conversion import destination_kind, write_official_pth, write_safetensors

  src, dst = os.fspath(src), os.fspath(dst)
  kind = destination_kind(dst)
  if kind == "orbax":
    raise ValueError(
      f"{src} holds a CNN: convert it to a .safetensors or .pth file (stages read the workdir "
      "itself as init.source)"
    )
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
  root, family = _params_root(src)
  params, _ = restore_subtree(src, ("params", *root))
  try:
    stats, _ = restore_subtree(src, ("model_state", "batch_stats", *root))
  except KeyError:
    stats = {}
  variables = {"params": params, "batch_stats": stats or {}}
  state = export_cnn(variables, family, convnext_names="timm")
  state = {n: np.ascontiguousarray(v) for n, v in state.items()}
  if log:
    log(f"{src}: {family} {'encoder' if root else 'classifier'}, {len(state)} tensors")
  if kind == "safetensors":
    write_safetensors(dst, state, metadata={"format": "pt", "mimdistill.source": src})
  else:
    write_official_pth(dst, state)
  return CNNExportReport(src, dst, family, "encoder" if root else "classifier", list(state))
