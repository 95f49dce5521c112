"""Where a stage's weights come from: a teacher's or an init's `source`,
which is a mimdistill workdir (`W` or `W:step`; a converted checkpoint is
one), a stage's `best/` folder (`W/best`: the best evaluated step) or an
official / timm `.pth` file.

`read_encoder` returns numpy trees in mimdistill layout: `encoder` is a
ViTEncoder's params, `encoder_fixed` its 'fixed' collection (the sin-cos
`pos_embed`), `head` the classifier params (`fc_norm`, `head`, and
`head_dist` / `conv1x1_*` of a distilled or TinyMIM*-T classifier) when the
source has them. `read_classifier` reads a whole classifier (a knowledge-
distillation teacher) from a workdir, its `best/`, or a `.pth` /
`.safetensors` file with official / timm names. The file formats themselves
are `mimdistill.interop`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from mimdistill import workdir as workdir_lib
from mimdistill.interop.official_names import official_to_flax
from mimdistill.interop.orbax_tree import is_best_dir, restore_best, restore_subtree, saved_state
from mimdistill.interop.pth_reader import load_pth
from mimdistill.paths import as_path, is_remote

PyTree = Any
PTH_SUFFIXES = (".pth", ".pt", ".bin")
FILE_SUFFIXES = (*PTH_SUFFIXES, ".safetensors")
# The classifier's params besides `encoder` (models.classifier).
HEAD_PARTS = ("fc_norm", "head", "head_dist", "conv1x1_0", "conv1x1_1")


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
    head = {k: params[k] for k in HEAD_PARTS if k in params}
    return EncoderSource(
      params["encoder"], None, head, {"kind": "pth", "path": os.path.abspath(path), "step": None}
    )
  workdir, _ = workdir_lib.parse_source(path)
  if not workdir.is_dir():
    raise FileNotFoundError(
      f"{what}={path}: no such workdir; run the earlier stage there first, or "
      "point at an existing workdir (workdir or workdir:step), its best/ or a .pth file"
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
  head = {k: params[k] for k in HEAD_PARTS if k in params}
  return EncoderSource(
    params["encoder"], fixed, head, {"kind": source_kind(path), "source": path, **record}
  )


def source_kind(source: str) -> str:
  """A workdir source's kind for the lineage record: 'best' or 'workdir'."""
  return "best" if is_best_dir(workdir_lib.parse_source(source)[0]) else "workdir"


def check_exists(source: str, what: str) -> None:
  """Refuses a local `source` (W, W:step, W/best, a file) that is not there,
  before a stage builds its datasets (a class folder or ADE20K is prepared
  on first use, which takes minutes)."""
  location = str(workdir_lib.parse_source(source)[0])
  if not (is_remote(source) or os.path.exists(location)):
    raise FileNotFoundError(
      f"{what}={source}: no such workdir or file; run the earlier stage there first, or "
      "point at a workdir (W or W:step), its best/, a converted folder or a .pth"
    )


def record_dir(source: str):
  """The folder whose records (config.json, model.json) describe `source`:
  its workdir, or for a `best/` folder the stage workdir holding it."""
  return as_path(source).parent if is_best_dir(source) else workdir_lib.parse_source(source)[0]


ARCH_FIELDS = ("width", "depth", "num_heads", "patch_size", "image_size")


def recorded_model(source: str) -> tuple[dict, str] | None:
  """The architecture a workdir source records (`config.json`'s signature of
  a stage workdir, `model.json` of a converted checkpoint) and where it was
  read; None for files and workdirs without a record. Heads a converter only
  assumed (not stored in the weights) are left out."""
  path = str(source)
  if path.endswith(PTH_SUFFIXES) or path.endswith(".safetensors"):
    return None
  workdir = record_dir(path)
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


@dataclasses.dataclass
class ClassifierSource:
  params: PyTree  # {'encoder', 'head', 'fc_norm'?, 'head_dist'?, 'conv1x1_*'?}, numpy
  record: dict  # lineage: kind, path, step
  model: dict  # what the source says its model is (a workdir's signature), else {}


def _not_a_classifier(what: str, path: str, found) -> ValueError:
  return ValueError(
    f"{what}={path} is not a classifier (it has {sorted(found)[:8]}, no head): point it at "
    "a fine-tuned model, i.e. a stage-3 workdir or its best/, an official fine-tuned "
    ".pth or a timm ViT .pth / .safetensors"
  )


def read_classifier(source: str, *, what: str = "teacher.source") -> ClassifierSource:
  """A whole classifier as numpy params in mimdistill layout (see the
  module doc). Linear-probe classifiers are refused: their BatchNorm
  statistics are not part of a fine-tuned model's params."""
  path = str(source)
  if path.endswith(FILE_SUFFIXES):
    from mimdistill.interop.conversion import read_source

    if is_remote(path):
      raise ValueError(
        f"{what}={path}: checkpoint files are memory-mapped and must be on a local disk; "
        f"copy it first (gcloud storage cp {path} .) and pass the local path"
      )
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{what}={path} does not exist; point it at a classifier file or a mimdistill workdir"
      )
    tensors = {n: np.asarray(v) for n, v in read_source(path).tensors.items()}
    variables, _ = official_to_flax(tensors, "classifier", learned_pos_embed=True)
    params = variables.get("params", {})
    if "encoder" not in params or "head" not in params:
      raise _not_a_classifier(what, path, tensors)
    kind = "safetensors" if path.endswith(".safetensors") else "pth"
    return ClassifierSource(params, {"kind": kind, "path": os.path.abspath(path), "step": None}, {})
  if is_best_dir(path):
    state, record = restore_best(path)
    params = state.get("params", {})
    model_state = state.get("model_state") or {}
    workdir = as_path(path).parent
  else:
    workdir, _ = workdir_lib.parse_source(path)
    if not workdir.is_dir():
      raise FileNotFoundError(
        f"{what}={path}: no such workdir; point it at a stage-3 workdir (W or W:step), its "
        "best/ folder, or a classifier .pth / .safetensors file"
      )
    saved = saved_state(path)
    if "params" not in saved.tree:
      raise ValueError(f"{what}={path} holds no params")
    model_state = saved.tree.get("model_state") or {}
    params, record = restore_subtree(path, ("params",))
  if "encoder" not in params or "head" not in params:
    raise _not_a_classifier(what, path, params)
  if model_state.get("batch_stats"):
    raise ValueError(
      f"{what}={path} is a linear-probe classifier (BatchNorm before the head); use a "
      "fine-tuned classifier as the teacher"
    )
  model = workdir_lib.signature(workdir).get("model") or {}
  return ClassifierSource(params, {"kind": "workdir", "source": path, **record}, dict(model))


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
  if not (workdir_lib.has_checkpoints(workdir) or is_best_dir(workdir)):
    return None
  tree = saved_state(path).tree
  if not _is_segmentor((tree.get("params") or {}).keys()):
    return None
  params, record = restore_subtree(path, ("params",))
  try:
    stats, _ = restore_subtree(path, ("model_state", "batch_stats"))
  except KeyError:
    stats = {}
  return SegmentorSource(params, stats, {"kind": source_kind(path), "source": path, **record})
