"""Where a stage's weights come from: a teacher's or an init's `source`,
which is a mimdistill workdir (`W` or `W:step`; a converted checkpoint is
one) or an official / timm `.pth` file.

`read_encoder` returns numpy trees in mimdistill layout: `encoder` is a
ViTEncoder's params, `encoder_fixed` its 'fixed' collection (the sin-cos
`pos_embed`), `head` the classifier params (`fc_norm`, `head`) when the
source has them. The file formats themselves are `mimdistill.interop`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from mimdistill import workdir as workdir_lib
from mimdistill.interop.official_names import official_to_flax
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.interop.pth_reader import load_pth
from mimdistill.paths import is_remote

PyTree = Any
PTH_SUFFIXES = (".pth", ".pt", ".bin")


def shape_table(tree: PyTree) -> dict[str, tuple]:
  """`'a/b/leaf' -> shape` for comparing a source's tree with a model's."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): tuple(
      getattr(x, "shape", None) or np.shape(x)
    )
    for path, x in flat
  }


@dataclasses.dataclass
class EncoderSource:
  encoder: PyTree
  encoder_fixed: PyTree | None
  head: dict
  record: dict  # lineage: kind, path, step


def read_encoder(source: str, *, what: str = "init") -> EncoderSource:
  """`what` names the config field in error messages (e.g. 'teacher.source')."""
  path = str(source)
  if path.endswith(PTH_SUFFIXES):
    if is_remote(path):
      raise ValueError(
        f"{what}={path}: .pth files are memory-mapped and must be "
        "on a local disk; copy it first (gcloud storage cp "
        f"{path} .) and pass the local path"
      )
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{what}={path} does not exist; point it at an official .pth file or a mimdistill workdir"
      )
    ckpt = load_pth(path)
    variables, _ = official_to_flax(ckpt.tensors, "classifier", learned_pos_embed=True)
    params = variables.get("params", {})
    if "encoder" not in params:
      raise ValueError(
        f"{what}={path} holds no ViT encoder weights (found {sorted(ckpt.tensors)[:8]}...)"
      )
    head = {k: params[k] for k in ("fc_norm", "head") if k in params}
    return EncoderSource(
      params["encoder"], None, head, {"kind": "pth", "path": os.path.abspath(path), "step": None}
    )
  workdir, _ = workdir_lib.parse_source(path)
  if not workdir.is_dir():
    raise FileNotFoundError(
      f"{what}={path}: no such workdir; run the earlier stage there first, or "
      "point at an existing workdir (workdir or workdir:step) or a .pth file"
    )
  try:
    params, record = restore_subtree(path, ("params",))
  except KeyError as e:
    raise ValueError(f"{what}={path} holds no params: {e}") from None
  if "encoder" not in params:
    raise ValueError(
      f"{what}={path} holds no encoder params (state/params/"
      f"encoder; it has {sorted(params)}); point at a stage-1, "
      "stage-2 or stage-3 workdir"
    )
  try:
    fixed, _ = restore_subtree(path, ("model_state", "fixed", "encoder"))
  except KeyError:
    fixed = None  # a learned position embedding is a param
  head = {k: params[k] for k in ("fc_norm", "head") if k in params}
  return EncoderSource(
    params["encoder"], fixed, head, {"kind": "workdir", "source": path, **record}
  )


@dataclasses.dataclass
class SegmentorSource:
  params: PyTree  # {'backbone', 'decode_head', 'auxiliary_head'?}
  batch_stats: PyTree  # the same roots, BatchNorm buffers
  record: dict  # lineage: kind, path, step


def _is_segmentor(names) -> bool:
  names = list(names)
  return any(n.startswith("backbone") for n in names) and any(
    n.startswith("decode_head") for n in names
  )


def read_segmentor(source: str, *, what: str = "init.source") -> SegmentorSource | None:
  """A whole segmentor (params and BatchNorm statistics) from an mmseg
  checkpoint (`{'meta', 'state_dict'}` with `backbone.*`, `decode_head.*`
  names), a converted one or a segmentation workdir; None when `source`
  holds only an encoder (then `read_encoder` reads it)."""
  from mimdistill.interop.orbax_tree import saved_state
  from mimdistill.interop.segmentation_names import mmcv_to_flax

  path = str(source)
  if path.endswith(PTH_SUFFIXES):
    if is_remote(path) or not os.path.isfile(path):
      return None  # read_encoder reports it
    ckpt = load_pth(path)
    if not _is_segmentor(ckpt.tensors):
      return None
    variables, _ = mmcv_to_flax(ckpt.tensors)
    record = {"kind": "pth", "path": os.path.abspath(path), "step": None}
    return SegmentorSource(variables["params"], variables.get("batch_stats", {}), record)
  workdir, _ = workdir_lib.parse_source(path)
  if not workdir.is_dir() or not workdir_lib.has_checkpoints(workdir):
    return None
  tree = saved_state(path).tree
  if not _is_segmentor((tree.get("params") or {}).keys()):
    return None
  params, record = restore_subtree(path, ("params",))
  try:
    stats, _ = restore_subtree(path, ("model_state", "batch_stats"))
  except KeyError:
    stats = {}
  return SegmentorSource(params, stats, {"kind": "workdir", "source": path, **record})
