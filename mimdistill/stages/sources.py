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


ARCH_FIELDS = ("width", "depth", "num_heads", "patch_size", "image_size")


def recorded_model(source: str) -> tuple[dict, str] | None:
  """The architecture a workdir source records (`config.json`'s signature of
  a stage workdir, `model.json` of a converted checkpoint) and where it was
  read; None for files and workdirs without a record. Heads a converter only
  assumed (not stored in the weights) are left out."""
  path = str(source)
  if path.endswith(PTH_SUFFIXES) or path.endswith(".safetensors"):
    return None
  workdir, _ = workdir_lib.parse_source(path)
  converted = workdir_lib.read_json(workdir, workdir_lib.MODEL) if workdir.is_dir() else None
  if converted:
    model = dict(converted.get("model") or {})
    for field in model.get("assumed") or ():
      model.pop(field, None)
    return {k: model[k] for k in ARCH_FIELDS if model.get(k) is not None}, str(
      workdir / workdir_lib.MODEL
    )
  model = workdir_lib.signature(workdir).get("model") if workdir.is_dir() else None
  if not model:
    return None
  return {k: model[k] for k in ARCH_FIELDS if model.get(k) is not None}, str(
    workdir / workdir_lib.CONFIG
  )


def check_recorded_architecture(section, source: str, what: str) -> None:
  """Fills the architecture fields `section` leaves unset from the source's
  record, and refuses one that disagrees with it (e.g. `teacher.num_heads=2`
  on a 4-head teacher would split the qkv projection wrongly)."""
  found = recorded_model(source)
  if found is None:
    return
  record, where = found
  custom = section.get("variant") == "custom"
  for field, value in record.items():
    if custom and section.get(field) is None:
      section[field] = value
  from mimdistill.models import variants

  spec = variants.resolve(section).kwargs()
  wrong = [(f, spec[f], v) for f, v in record.items() if spec.get(f) != v]
  if wrong:
    shown = ", ".join(f"{what}.{f}={a} but {b} there" for f, a, b in wrong)
    fix = " ".join(f"--config.{what}.{f}={b}" for f, _, b in wrong)
    raise ValueError(f"{what}.source={source}: {shown} ({where}); set {fix}")
