"""Checkpoint conversion: official / timm `.pth`, safetensors, mimdistill Orbax.

    convert(SRC, DST)  ==  python -m mimdistill.convert SRC DST

(This module is the library; `mimdistill/convert.py` is its command line.)

Sources (the kind is taken from the path):
  * a `torch.save` file (`.pth`, `.pt`, `.bin`, ...): read by the safe,
    torch-free `pth_reader` (allow-list unpickler; tensors memory-mapped);
  * a `.safetensors` file with official / timm names (memory-mapped);
  * a directory: a mimdistill workdir (`W` or `W:step`; a converted
    checkpoint is one), a step folder `W/checkpoints/<step>`, or any Orbax
    `PyTreeCheckpointer` folder of Flax variables / params.
Destinations:
  * `*.safetensors`: official / timm names and orientation, the fixed
    buffers (`pos_embed`, `decoder_pos_embed`) included, so the official
    modules and timm load it with `strict=True`;
  * `*.pth` / `*.pt` / `*.bin`: the same tensors as an official torch
    checkpoint `{'model': state_dict}`, written without torch
    (`pth_writer`), which `torch.load(weights_only=True)` reads;
  * a folder name (no other extension): a directory laid out as a workdir that every stage reads
    (`teacher.source=DST`, or `restore_subtree(DST, ('params', 'encoder'))`):
        DST/checkpoints/0/state   Orbax: {'params': ..., 'model_state': {'fixed': ...}}
        DST/model.json            layout + detected model (`ModelSpec`)
        DST/config.json           signature {'stage': 'convert', 'model': ...}
        DST/lineage.json          where it came from
    The encoder is always the `encoder` subtree (as in every stage's params);
    an MAE adds `decoder`, a classifier `fc_norm` (average pooling) and
    `head`.

The model is detected from the tensors (`layouts.detect`); the head count
is not in the weights and comes from `num_heads=` or the standard width.

Memory: tensors are streamed one at a time. Source tensors are read-only
views of a memory-mapped file, and the pages of each are handed back to the
OS (`madvise(MADV_DONTNEED)`) once it has been copied or written, so a
conversion holds at most one copy of the weights (the Orbax tree, whose
writer is throttled) plus one tensor. See `launch/measure_convert_memory.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import mmap as mmap_module
import os
import pathlib
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np
from etils import epath

from mimdistill import workdir as workdir_lib
from mimdistill.interop import layouts
from mimdistill.interop.layouts import LayoutError, ModelSpec
from mimdistill.interop.official_names import (
  canonical_name,
  iter_official_to_flax,
  official_name,
  to_official_leaf,
)
from mimdistill.interop.orbax_tree import is_best_dir, numpy_restore_args, saved_state
from mimdistill.interop.pth_reader import CheckpointReadError, CorruptCheckpointError, load_pth
from mimdistill.paths import is_remote

__all__ = [
  "ConvertReport",
  "SafetensorsError",
  "convert",
  "read_safetensors",
  "read_source",
  "write_safetensors",
]

FORMAT = "mimdistill-converted"
FORMAT_VERSION = 1
MODEL_JSON = workdir_lib.MODEL
# Orbax may stage this many bytes of the tree at once while writing; the
# tree itself is the one full copy a conversion to Orbax holds.
SAVE_CONCURRENT_GB = 0.25


class SafetensorsError(CorruptCheckpointError):
  """A `.safetensors` file that is truncated, corrupt or not safetensors."""


# -----------------------------------------------------------------------------
# Memory: hand the pages of a memory-mapped tensor back once it is consumed
# -----------------------------------------------------------------------------
_PAGE = mmap_module.PAGESIZE


def _mmap_base(array: np.ndarray):
  base = array
  while isinstance(base, np.ndarray):
    base = base.base
  if isinstance(base, memoryview):
    base = base.obj
  return base if isinstance(base, mmap_module.mmap) else None


def release(array) -> None:
  """Drops the resident pages of a read-only memory-mapped tensor (a no-op for
  ordinary arrays). The data stays valid: pages are re-read on next use."""
  if not isinstance(array, np.ndarray) or not array.size:
    return
  mm = _mmap_base(array)
  if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
    return
  try:
    origin = np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]
    start = array.__array_interface__["data"][0] - origin
    end = start + array.nbytes
    first = (start // _PAGE) * _PAGE
    mm.madvise(mmap_module.MADV_DONTNEED, first, min(end, len(mm)) - first)
  except (ValueError, OSError):  # e.g. a closed map: nothing to release
    pass


def _consume(mapping: MutableMapping[str, Any], names) -> Iterator[tuple[str, Any]]:
  """Yields and removes entries, so each is freed once the caller is done."""
  for name in list(names):
    yield name, _materialize(mapping.pop(name))


# -----------------------------------------------------------------------------
# safetensors (own streaming reader / writer: memory-mapped in, one tensor out)
# -----------------------------------------------------------------------------
def _st_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes

  return {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
  }


def _header(path: str) -> tuple[int, dict]:
  """(data start, header) as stored, in file order (the library reports
  names sorted); read after the library has validated the header."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n).decode("utf-8"))
  header.pop("__metadata__", None)
  return 8 + n, header


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """`(name -> array, metadata)` of a `.safetensors` file in its stored
  order. The `safetensors` library validates the file (header against data
  lengths: a truncated or corrupt file is refused before anything is read);
  the tensors are then read-only views of a memory map of the file, whose
  pages a conversion hands back once each tensor is written (`release`):
  the library's own `get_tensor` copies into memory it keeps mapped, which
  doubled a safetensors -> Orbax conversion's peak (2.12x the file against
  1.09x, `launch/measure_convert_memory.py`)."""
  from safetensors import SafetensorError, safe_open

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointReadError(f"no safetensors file at {path!r}")
  size = os.path.getsize(path)
  hint = "re-download or re-export the file"
  if size < 8:
    raise SafetensorsError(
      f"{path!r} is {size} bytes: too short for a safetensors file (truncated?); {hint}"
    )
  try:
    with safe_open(path, framework="numpy") as handle:
      metadata = handle.metadata() or {}
      kinds = {
        n: (handle.get_slice(n).get_dtype(), handle.get_slice(n).get_shape()) for n in handle.keys()
      }
    start, header = _header(path)
  except SafetensorError as exc:
    what = str(exc)
    if "incomplete metadata" in what or "not fully covered" in what or "too large" in what:
      what = f"the file is truncated or its data lengths disagree with the header ({exc})"
    else:
      what = f"the header is corrupt ({exc})"
    raise SafetensorsError(f"{path!r}: {what}; {hint}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as exc:
    raise SafetensorsError(f"{path!r}: the header is corrupt ({exc}); {hint}") from None
  dtypes = _st_dtypes()
  tensors = {}
  buf = None
  if size > start:
    with open(path, "rb") as f:
      buf = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
  for name, info in header.items():
    code, shape = kinds[name]
    dtype, shape = dtypes[code], tuple(int(d) for d in shape)
    begin = int(info["data_offsets"][0])
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
      tensors[name] = np.empty(shape, dtype)
    else:
      tensors[name] = np.frombuffer(buf, dtype, count=count, offset=start + begin).reshape(shape)
  return tensors, {str(k): str(v) for k, v in metadata.items()}


def write_safetensors(
  path,
  tensors: MutableMapping[str, Any],
  *,
  metadata: Mapping[str, str] | None = None,
  consume: bool = False,
) -> None:
  """Writes `name -> array` (any orientation: one tensor is made contiguous at
  a time) to `path` atomically. `consume=True` pops each entry once written,
  freeing it (and drops the pages of memory-mapped sources)."""
  path = pathlib.Path(path)
  names_by_dtype = {v: k for k, v in _st_dtypes().items()}
  header: dict[str, Any] = {}
  offset = 0
  for name, value in tensors.items():
    dtype = np.dtype(value.dtype)
    if dtype not in names_by_dtype:
      raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
    nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {
      "dtype": names_by_dtype[dtype],
      "shape": list(value.shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  if metadata:
    header = {"__metadata__": dict(metadata), **header}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  tmp = path.with_name(path.name + f".partial-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      items = _consume(tensors, list(tensors)) if consume else list(tensors.items())
      for _name, value in items:
        source = value = _materialize(value)
        value = np.ascontiguousarray(value)
        if value.size:
          f.write(memoryview(value.reshape(-1).view(np.uint8)))
        release(source)
        del value, source
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


# -----------------------------------------------------------------------------
# Reading a source into official names
# -----------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
  """A checkpoint read into official names (values may be lazy views)."""

  kind: str  # 'pth' | 'safetensors' | 'workdir' | 'orbax'
  path: str
  tensors: dict[str, np.ndarray]
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  hints: dict[str, Any] = dataclasses.field(default_factory=dict)  # detect() defaults
  order: list[str] | None = None  # the original official order, when known


_ENCODER_PARTS = ("encoder", "decoder", "fc_norm", "head", "head_dist", "conv1x1_0", "conv1x1_1")
_CLASSIFIER_PARTS = ("fc_norm", "head", "head_dist")


class LazyTensor:
  """A tensor of an Orbax checkpoint in the official orientation, restored
  when first used (together with the rest of its block, then handed out one
  by one), so a conversion never holds more of the source than one block."""

  __slots__ = ("shape", "dtype", "_load")

  def __init__(self, shape: tuple[int, ...], dtype, load: Callable[[], np.ndarray]):
    self.shape, self.dtype, self._load = tuple(shape), np.dtype(dtype), load

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def materialize(self) -> np.ndarray:
    return self._load()

  def __array__(self, dtype=None, copy=None):
    value = self._load()
    return value if dtype is None else value.astype(dtype)

  def __repr__(self):
    return f"LazyTensor({self.shape}, {self.dtype})"


def _materialize(value):
  return value.materialize() if isinstance(value, LazyTensor) else value


def _group_of(name: str) -> str:
  """Tensors restored together: one block, or everything outside the blocks."""
  parts = name.split(".")
  return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else ""


class _GroupedRestore:
  """Restores the leaves of an Orbax tree one group (block) at a time."""

  def __init__(self, restore: Callable[[dict], dict], entries: dict[str, tuple]):
    self._restore = restore  # nested item of metadata -> nested numpy
    self._entries = entries  # official name -> (path in the tree, leaf key)
    self._cache: dict[str, np.ndarray] = {}
    self._done: set[str] = set()

  def load(self, name: str) -> np.ndarray:
    if name in self._cache:
      return self._cache.pop(name)
    if name in self._done:  # asked again: restore just this one
      names = [name]
    else:
      group = _group_of(name)
      names = [n for n in self._entries if _group_of(n) == group and n not in self._done]
    item: dict = {}
    for n in names:
      path, _, meta = self._entries[n]
      node = item
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = meta
    restored = self._restore(item)
    for n in names:
      path, leaf, _ = self._entries[n]
      node = restored
      for key in path:
        node = node[key]
      self._cache[n] = to_official_leaf(leaf, np.asarray(node))
      self._done.add(n)
    return self._cache.pop(name)


def _official_shape(leaf: str, shape) -> tuple[int, ...]:
  dummy = np.broadcast_to(np.empty((), np.uint8), tuple(shape))  # no memory
  return tuple(to_official_leaf(leaf, dummy).shape)


def _lazy_official(
  tree: Mapping[str, Any], restore: Callable[[dict], dict]
) -> tuple[dict, dict, dict]:
  """Official-named lazy tensors of a metadata tree of Flax variables
  `{params, fixed}`, or of a TrainState `{step, params, model_state: {fixed,
  ...}, opt_state, rng}` of any stage's model (a converted folder holds
  `{params, model_state}`); parts no official model has are skipped and
  never read."""
  skipped, hints = {}, {}
  if isinstance(tree, Mapping) and "params" in tree:
    params = dict(tree["params"])
    if "model_state" in tree:
      fixed = dict((tree["model_state"] or {}).get("fixed") or {})
      roots = {"params": ("params",), "fixed": ("model_state", "fixed")}
      for key in tree["model_state"] or {}:
        if key != "fixed":
          skipped[f"model_state/{key}"] = "not part of an official model"
    else:
      fixed = dict(tree.get("fixed") or {})
      roots = {"params": ("params",), "fixed": ("fixed",)}
    for key in tree:
      if key not in ("params", "fixed", "model_state"):
        skipped[key] = "training state, not read"
  else:
    params, fixed, roots = dict(tree), {}, {"params": (), "fixed": ("fixed",)}
  nested = "cls_token" in params  # official_names' 'vit' layout: the encoder at the top
  if nested:
    params, fixed = {"encoder": params}, ({"encoder": fixed} if fixed else {})
  if "encoder" not in params:
    raise LayoutError(
      f"the checkpoint's params ({', '.join(sorted(params)) or 'none'}) hold no ViT encoder "
      "(expected params/encoder or params/cls_token)"
    )
  for part in sorted(set(params) - set(_ENCODER_PARTS)):
    skipped[f"params/{part}"] = (
      "not part of an official model (distillation heads)"
      if part == "heads"
      else "not part of an official model"
    )
  for part in sorted(set(fixed) - {"encoder", "decoder"}):
    skipped[f"fixed/{part}"] = "not part of an official model"
  params = {k: v for k, v in params.items() if k in _ENCODER_PARTS}
  fixed = {k: v for k, v in fixed.items() if k in ("encoder", "decoder")}
  names_layout = "classifier" if set(params) & set(_CLASSIFIER_PARTS) else "mae"
  if "pos_embed" in params["encoder"]:
    hints["pos_embed"] = "learned"
  elif "pos_embed" in fixed.get("encoder", {}):
    hints["pos_embed"] = "fixed"

  import jax

  entries, shapes = {}, {}
  for collection, subtree in (("params", params), ("fixed", fixed)):
    for keys, meta in jax.tree_util.tree_flatten_with_path(subtree)[0]:
      path = [str(getattr(k, "key", k)) for k in keys]
      name = official_name(path, names_layout)
      stored = list(path[1:]) if nested else path  # where it is in the checkpoint
      entries[name] = ((*roots[collection], *stored), path[-1], meta)
      shapes[name] = (_official_shape(path[-1], meta.shape), meta.dtype)
  loader = _GroupedRestore(restore, entries)
  tensors = {
    name: LazyTensor(shape, dtype, functools.partial(loader.load, name))
    for name, (shape, dtype) in shapes.items()
  }
  return tensors, skipped, hints


def _is_orbax_dir(path: epath.Path) -> bool:
  return any(
    (path / marker).exists()
    for marker in ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")
  )


def _handler():
  """A PyTree handler that writes the leaves where they are: no deep copy of
  numpy leaves before writing (Orbax's default: a second full copy), no
  compression (zstd buffers every compressed chunk of an OCDBT checkpoint
  until it is committed, almost another copy, to save a few percent on
  float weights), at most SAVE_CONCURRENT_GB of reads or writes in flight."""
  import jax
  import orbax.checkpoint as ocp

  registry = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.ArrayHandler()),
  )
  return ocp.PyTreeCheckpointHandler(
    save_concurrent_gb=SAVE_CONCURRENT_GB,
    restore_concurrent_gb=SAVE_CONCURRENT_GB,
    use_compression=False,
    type_handler_registry=registry,
  )


def _metadata_tree(meta):
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  return getattr(tree, "tree", tree)


def _orbax_dir_reader(path: epath.Path) -> tuple[dict, Callable[[dict], dict]]:
  """(metadata tree, restore(item) -> numpy) of a PyTreeCheckpointer folder."""
  import orbax.checkpoint as ocp

  with ocp.Checkpointer(_handler()) as ckptr:
    tree = _metadata_tree(ckptr.metadata(path))

  def restore(item: dict) -> dict:
    with ocp.Checkpointer(_handler()) as ckptr:
      return ckptr.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item=item, restore_args=numpy_restore_args(item), partial_restore=True
        ),
      )

  return tree, restore


def _workdir_reader(src: str) -> tuple[dict, Callable[[dict], dict], str]:
  """(metadata tree of `state`, restore(item) -> numpy, step folder) of a
  workdir's checkpoint (`W` or `W:step`)."""
  try:
    saved = saved_state(src, handler=_handler())
  except FileNotFoundError as e:
    raise CheckpointReadError(str(e)) from None
  if not isinstance(saved.tree, dict) or "params" not in saved.tree:
    raise CheckpointReadError(f"{saved.location} holds no state/params")
  return saved.tree, saved.restore, saved.location


def _stage_hints(workdir: epath.Path) -> dict[str, Any]:
  """The heads a stage workdir's config.json records (the weights do not)."""
  saved = workdir_lib.read_json(workdir, workdir_lib.CONFIG) or {}
  model = saved.get("signature", {}).get("model") or {}
  hints = {}
  if model.get("num_heads"):
    hints["num_heads"] = int(model["num_heads"])
  decoder = (saved.get("config", {}).get("model") or {}).get("decoder") or {}
  if decoder.get("num_heads"):
    hints["decoder_num_heads"] = int(decoder["num_heads"])
  return hints


def _read_dir(src: str) -> Source:
  path, step = workdir_lib.parse_source(src)
  hints: dict[str, Any] = {}
  best = is_best_dir(path)  # W/best reads like a workdir; its records are W's
  if (path / "checkpoints").is_dir() or best:
    kind = "best" if best else "workdir"
    tree, restore, location = _workdir_reader(src)
    records = path.parent if best else path
    model_json = records / MODEL_JSON
    order = None
    if model_json.is_file():
      record = json.loads(model_json.read_text())
      hints.update(_spec_hints(record.get("model", {})))
      order = record.get("tensor_order")
    else:
      hints.update(_stage_hints(records))
  else:
    kind, order = "orbax", None
    if step is not None:
      raise CheckpointReadError(
        f"{src!r}: ':{step}' selects a step of a workdir, but {path} has no checkpoints/ folder"
      )
    if is_best_dir(path.parent) and path.name.isdigit():  # W/best/<step>
      hints.update(_stage_hints(path.parent.parent))
    # a step folder: W/checkpoints/<step> holds its state, W/best/<step> its params
    for item in ("state", "params"):
      if (path / item).is_dir() and _is_orbax_dir(path / item):
        path = path / item
        break
    if not _is_orbax_dir(path):
      raise CheckpointReadError(
        f"{src!r} is a directory but neither a mimdistill workdir (no checkpoints/) nor an "
        "Orbax checkpoint (no _CHECKPOINT_METADATA / _METADATA); pass a workdir, a "
        "checkpoint folder, or a .pth / .safetensors file"
      )
    tree, restore = _orbax_dir_reader(path)
    location = str(path)
  tensors, skipped, flax_hints = _lazy_official(tree, restore)
  hints = {**flax_hints, **hints}
  return Source(kind, location, tensors, skipped, {}, hints, order)


def _spec_hints(spec: Mapping[str, Any]) -> dict[str, Any]:
  hints = {}
  assumed = set(spec.get("assumed", ()))
  if spec.get("num_heads") and "num_heads" not in assumed:
    hints["num_heads"] = int(spec["num_heads"])
  decoder = spec.get("decoder") or {}
  if decoder.get("num_heads") and "decoder.num_heads" not in assumed:
    hints["decoder_num_heads"] = int(decoder["num_heads"])
  if spec.get("pos_embed"):
    hints["pos_embed"] = spec["pos_embed"]
  return hints


def _looks_like_safetensors(path: str) -> bool:
  if path.endswith(".safetensors"):
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(9)
  except OSError:
    return False
  return len(head) == 9 and head[8:9] == b"{"


def read_source(src, *, key: str | None = None) -> Source:
  """Reads any supported source into official names (see the module doc)."""
  src = os.fspath(src)

  if workdir_lib.parse_source(src)[0].is_dir():  # local or gs:// workdir / Orbax folder
    return _read_dir(src)
  if is_remote(src):
    raise CheckpointReadError(
      f"no workdir or Orbax checkpoint at {src!r}; .pth and .safetensors files "
      "are memory-mapped and must be on a local disk: copy them first "
      f"(gcloud storage cp {src} .)"
    )
  if not os.path.exists(src):
    raise CheckpointReadError(
      f"no checkpoint at {src!r}: expected a .pth / .safetensors file, a workdir "
      "(W or W:step) or an Orbax checkpoint folder"
    )
  if _looks_like_safetensors(src):
    tensors, metadata = read_safetensors(src)
    hints = {}
    if "mimdistill.model" in metadata:
      try:
        hints = _spec_hints(json.loads(metadata["mimdistill.model"]))
      except (json.JSONDecodeError, AttributeError):
        pass
    return Source("safetensors", src, tensors, {}, metadata, hints)
  ckpt = load_pth(src, key=key)
  skipped = dict(ckpt.skipped)
  metadata = dict(ckpt.metadata)
  if ckpt.stripped_prefix:
    metadata["stripped_prefix"] = ckpt.stripped_prefix
  return Source("pth", src, dict(ckpt.tensors), skipped, metadata, {})


# -----------------------------------------------------------------------------
# The conversion
# -----------------------------------------------------------------------------
@dataclasses.dataclass
class ConvertReport:
  src: str
  dst: str
  src_kind: str
  dst_kind: str  # 'safetensors' | 'pth' | 'orbax'
  spec: ModelSpec
  used: list[str]
  skipped: dict[str, str]  # name or top-level key -> why
  missing: dict[str, str]  # expected name -> what was done
  notes: list[str]

  def __str__(self) -> str:
    lines = [f"source      {self.src} ({self.src_kind})", f"detected    {self.spec.describe()}"]
    lines += [f"note        {note}" for note in self.notes]
    lines.append(f"used        {len(self.used)} tensors")
    if self.skipped:
      lines.append(f"skipped     {len(self.skipped)}:")
      lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
    else:
      lines.append("skipped     nothing")
    if self.missing:
      lines.append(f"missing     {len(self.missing)}:")
      lines += [f"  {name}: {what}" for name, what in self.missing.items()]
    else:
      lines.append("missing     nothing")
    lines.append(f"wrote       {self.dst} ({self.dst_kind})")
    return "\n".join(lines)

  def to_json(self) -> dict:
    record = dataclasses.asdict(self)
    record["spec"] = self.spec.to_json()
    return record


def _heads_note(spec: ModelSpec) -> list[str]:
  notes = []
  if "num_heads" in spec.assumed:
    notes.append(
      f"num_heads={spec.num_heads} is assumed from the standard width "
      f"{spec.width} (heads are not stored in the weights); pass --num_heads=N "
      "(num_heads=N) if the model was trained with another count"
    )
  elif spec.num_heads is None:
    notes.append(
      f"num_heads is unknown (width {spec.width} has no standard head count); "
      "pass --num_heads=N to record it"
    )
  if "decoder.num_heads" in spec.assumed:
    notes.append(
      f"decoder num_heads={spec.decoder.num_heads} is assumed (MAE's default); "
      "override with --decoder_num_heads=N"
    )
  if spec.layout == "classifier" and spec.pooling == "cls":
    notes.append(
      "pooling=cls is read from the weights (a final norm, no fc_norm): the CLS token feeds the "
      "head, as timm's global_pool='token'; a timm model made with global_pool='avg' and "
      "fc_norm=False looks the same but averages the patch tokens, which mimdistill's classifier "
      "does not do: do not use such a model through this conversion"
    )
  if "image_size" in spec.assumed:
    notes.append(
      f"image_size={spec.image_size} is assumed (the checkpoint has no pos_embed);"
      " override with --image_size=N"
    )
  return notes


def _fill_missing(spec: ModelSpec, tensors: dict, missing: list[str]) -> dict[str, str]:
  """Computes what can be computed (the sin-cos buffers), else raises."""
  from mimdistill.models.pos_embed import sincos_2d

  dtype = np.dtype(tensors["cls_token"].dtype)
  filled, absent = {}, []
  for name in missing:
    if name == "pos_embed":
      table = sincos_2d(spec.width, spec.grid)
      if spec.dist_token:  # the distillation token's row, zeros like CLS's
        table = np.concatenate([table[:1], np.zeros_like(table[:1]), table[1:]])
      tensors[name] = table[None].astype(dtype)
      filled[name] = (
        f"computed: 2-D sin-cos for {spec.image_size}x{spec.image_size} "
        f"images (MAE's fixed embedding)"
      )
    elif name == "decoder_pos_embed":
      tensors[name] = sincos_2d(spec.decoder.width, spec.grid)[None].astype(dtype)
      filled[name] = "computed: 2-D sin-cos (MAE's fixed decoder embedding)"
    else:
      absent.append(name)
  if absent:
    raise LayoutError(
      f"the checkpoint lacks {len(absent)} tensor(s) of the detected model "
      f"({spec.describe()}): {layouts._preview(absent)}; the file is incomplete or holds "
      "another architecture"
    )
  return filled


def convert(
  src,
  dst,
  *,
  layout: str | None = None,
  num_heads: int | None = None,
  image_size: int | None = None,
  decoder_num_heads: int | None = None,
  pos_embed: str | None = None,
  key: str | None = None,
  allow_unknown: bool = False,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
  out_indices: list[int] | None = None,
) -> ConvertReport:
  """Converts SRC into DST (see the module doc); returns the report.
  A whole segmentor (mmcv `backbone.*` / `decode_head.*` names, or a
  workdir holding one) goes to `segmentation_conversion.convert`, a
  workdir holding a CNN to `cnn_conversion.convert`.

  Args:
    layout: 'vit' | 'mae' | 'classifier'; default detected ('vit' keeps only
      the encoder of an MAE or classifier checkpoint).
    num_heads, decoder_num_heads: attention heads (not stored in weights);
      default: the standard value for the width, reported as assumed.
    image_size: only for checkpoints without `pos_embed` (default 224).
    pos_embed: 'fixed' (sin-cos buffer) | 'learned' (param); default learned
      for classifiers, else fixed.
    key: top-level key of a `.pth` holding the state dict (default 'model',
      'state_dict', 'module' or the top level).
    allow_unknown: skip tensors mimdistill's ViT has no place for (register
      tokens, qk-norm, ...) instead of refusing the file.
    overwrite: replace an existing DST.
    log: called with progress lines (e.g. `print`).
  """
  from mimdistill.interop import cnn_conversion, segmentation_conversion

  given = {
    "layout": layout,
    "num_heads": num_heads,
    "image_size": image_size,
    "decoder_num_heads": decoder_num_heads,
    "pos_embed": pos_embed,
    "key": key,
    "allow_unknown": allow_unknown or None,
    "out_indices": out_indices,
  }
  for name in ("num_heads", "image_size", "decoder_num_heads"):
    if given[name] is not None and given[name] < 1:
      raise ValueError(f"--{name}={given[name]} must be a positive integer, or left out")
  _check_paths(src, dst)
  if not is_remote(os.fspath(src)) and cnn_conversion.handles(src):
    _refuse_flags(given, set(given), f"{src} holds a CNN, whose conversion takes no model options")
    return cnn_conversion.convert(src, dst, overwrite=overwrite, log=log)
  if not is_remote(os.fspath(src)) and segmentation_conversion.handles(src, key=key):
    if not is_remote(os.fspath(dst)):
      _refuse_flags(
        given,
        {"layout", "decoder_num_heads", "pos_embed", "allow_unknown"},
        f"{src} is a whole segmentor, whose conversion takes only --num_heads, --image_size, "
        "--key and --out_indices",
      )
      return segmentation_conversion.convert(
        src,
        dst,
        key=key,
        out_indices=out_indices,
        num_heads=num_heads,
        image_size=image_size,
        overwrite=overwrite,
        log=log,
      )
  _refuse_flags(given, {"out_indices"}, f"{src} is not a segmentor (out_indices are a segmentor's)")
  src_text = os.fspath(src)
  if key is not None and (
    workdir_lib.parse_source(src_text)[0].is_dir()
    or (os.path.isfile(src_text) and _looks_like_safetensors(src_text))
  ):
    _refuse_flags(given, {"key"}, f"{src} is not a .pth (--key picks the weights inside one)")
  say = log or (lambda _: None)
  dst = os.fspath(dst)
  if is_remote(dst):
    raise ValueError(
      f"destination {dst!r} is in a bucket; convert to a local "
      "path, then copy it (gcloud storage cp -r LOCAL "
      f"{dst})"
    )
  dst_kind = destination_kind(dst)
  to_safetensors = dst_kind != "orbax"  # a single file
  _check_destination(dst, to_safetensors, overwrite)

  source = read_source(src, key=key)
  # One name per tensor whatever codebase wrote it (timm's layer scale).
  source.tensors = {canonical_name(n): v for n, v in source.tensors.items()}
  if source.order:
    source.order = [canonical_name(n) for n in source.order]
  say(f"read {source.path} ({source.kind}): {len(source.tensors)} tensors")
  hints = dict(source.hints)
  given = dict(
    layout=layout,
    num_heads=num_heads,
    image_size=image_size,
    decoder_num_heads=decoder_num_heads,
    pos_embed=pos_embed,
  )
  hints.update({k: v for k, v in given.items() if v is not None})
  shapes = {n: tuple(v.shape) for n, v in source.tensors.items()}
  dtypes = {n: np.dtype(v.dtype) for n, v in source.tensors.items()}
  spec = layouts.detect(shapes, dtypes=dtypes, **hints)
  say(f"detected {spec.describe()}")
  if not to_safetensors:
    spec.require_heads("an Orbax checkpoint (its model.json is what stages build from)")
  notes = _heads_note(spec)
  for name in ("num_heads", "decoder_num_heads"):
    recorded = source.hints.get(name)
    if given[name] is not None and recorded is not None and given[name] != recorded:
      # heads only split the qkv projection: another count is another model
      # (TinyMIM re-reads a distilled student with fewer heads on purpose)
      notes.append(
        f"--{name}={given[name]} overrides the {recorded} heads recorded for {source.path}: "
        f"its weights were trained with {recorded}, the converted model splits attention "
        f"into {given[name]}"
      )
  for note in notes:
    say(f"note: {note}")

  check = layouts.check_names(spec, shapes)
  if check.wrong_shape:
    shown = "; ".join(
      f"{n} is {got}, expected {want}" for n, (got, want) in list(check.wrong_shape.items())[:8]
    )
    raise LayoutError(
      f"{source.path}: tensors do not fit the detected model ({spec.describe()}): {shown}"
    )
  skipped = {**source.skipped, **check.dropped}
  unknown = check.unexpected
  if allow_unknown:
    skipped.update(unknown)
  elif unknown:
    shown = "; ".join(f"{n} ({why})" for n, why in list(unknown.items())[:8])
    raise LayoutError(
      f"{source.path} has {len(unknown)} tensor(s) mimdistill's ViT has no place for: "
      f"{shown}{' ...' if len(unknown) > 8 else ''}. Converting without them would change "
      "the model; pass --allow_unknown to drop them anyway"
    )
  for name in skipped:
    if name in source.tensors:
      release(source.tensors.pop(name))
  missing = _fill_missing(spec, source.tensors, check.missing)
  # The original order where known (a .pth, a safetensors file, a folder that
  # recorded it), else the official module's; computed tensors go last.
  known = source.order or (list(source.tensors) if source.kind in ("pth", "safetensors") else [])
  order = [n for n in known if n in source.tensors and n not in missing]
  seen = set(order)
  order += [n for n in spec.expected_names() if n in source.tensors and n not in seen]
  tensors = {n: source.tensors.pop(n) for n in order}
  source.tensors.clear()

  if dst_kind == "safetensors":
    metadata = {
      "format": "pt",
      "mimdistill.model": json.dumps(spec.to_json()),
      "mimdistill.source": os.fspath(source.path),
    }
    write_safetensors(dst, tensors, metadata=metadata, consume=True)
  elif dst_kind == "pth":
    write_official_pth(dst, tensors)
  else:
    report_stub = dict(src=os.fspath(source.path), src_kind=source.kind)
    _write_converted_dir(dst, spec, tensors, report_stub, order=order, overwrite=overwrite)
  report = ConvertReport(
    src=os.fspath(source.path),
    dst=dst,
    src_kind=source.kind,
    dst_kind=dst_kind,
    spec=spec,
    used=[n for n in order if n not in missing],
    skipped=skipped,
    missing=missing,
    notes=notes,
  )
  return report


PTH_SUFFIXES = (".pth", ".pt", ".bin")


def destination_kind(dst: str) -> str:
  """The extension decides: '.safetensors', '.pth' / '.pt' / '.bin' (a torch
  checkpoint) or a folder (an Orbax checkpoint laid out as a workdir: a name
  without one of those extensions, or an existing folder)."""
  if dst.endswith(".safetensors"):
    return "safetensors"
  if dst.endswith(PTH_SUFFIXES):
    return "pth"
  suffix = pathlib.Path(dst).suffix
  if suffix and not pathlib.Path(dst).is_dir() and not suffix[1:].isdigit():
    raise ValueError(
      f"destination {dst!r}: unknown extension {suffix!r}; use *.safetensors, *.pth (a torch "
      "checkpoint) or a folder name (an Orbax checkpoint every stage reads)"
    )
  return "orbax"


def write_official_pth(
  dst: str,
  tensors: MutableMapping[str, Any],
  *,
  wrap: str = "model",
  extra: Mapping[str, Any] | None = None,
) -> None:
  """`{wrap: state_dict, **extra}` (default `{'model': state_dict}`; mmcv's
  is `{'meta', 'state_dict'}`) in torch's zip format with official names,
  the official orientation and dtypes, written without torch, one tensor in
  memory at a time, atomically; `torch.load(dst, weights_only=True)` and the
  official model's `load_state_dict(..., strict=True)` read it."""
  from mimdistill.interop.pth_writer import write_state_dict

  def lazy(value):
    def make():
      array = np.ascontiguousarray(_materialize(value))
      release(value)
      return array

    return make, tuple(value.shape), np.dtype(value.dtype)

  state = {name: lazy(value) for name, value in tensors.items()}
  path = pathlib.Path(dst)
  tmp = path.with_name(path.name + f".partial-{os.getpid()}")
  try:
    write_state_dict(tmp, state, wrap=wrap, extra=extra)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  tensors.clear()


def _refuse_flags(given: dict, names, why: str) -> None:
  """Options that do not apply to this source are refused, not ignored: a
  user who passed one expects it to have changed the result."""
  bad = [n for n in given if n in names and given[n] is not None]
  if bad:
    flags = ", ".join(f"--{n}" for n in bad)
    raise ValueError(f"{flags} does not apply here: {why}; drop it")


def _check_paths(src, dst) -> None:
  """SRC and DST may not overlap: writing DST into a workdir SRC would mix a
  conversion into a training run's folder, and --overwrite of a DST that is
  or holds SRC would delete the checkpoint being converted."""
  src_text, dst_text = os.fspath(src), os.fspath(dst)
  if is_remote(src_text) or is_remote(dst_text):
    return
  src_path = pathlib.Path(os.path.abspath(workdir_lib.parse_source(src_text)[0]))
  dst_path = pathlib.Path(os.path.abspath(dst_text))
  if dst_path == src_path or src_path in dst_path.parents:
    where = "is" if dst_path == src_path else "is inside"
    raise ValueError(
      f"destination {dst_text} {where} the source {src_text}; write it outside the source"
    )
  if dst_path in src_path.parents:
    raise ValueError(
      f"destination {dst_text} holds the source {src_text}; replacing it would delete the "
      "source: write it elsewhere"
    )
  parent = dst_path.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"destination {dst_text} is under the file {parent}; pass another path")


def _check_destination(dst: str, to_safetensors: bool, overwrite: bool) -> None:
  path = pathlib.Path(dst)
  if path.exists() and not overwrite:
    if to_safetensors or not path.is_dir() or any(path.iterdir()):
      raise FileExistsError(
        f"{dst} already exists; pass --overwrite (overwrite=True) to "
        "replace it, or choose another destination"
      )
  if to_safetensors and path.is_dir():
    raise IsADirectoryError(f"{dst} is a directory; a {path.suffix} destination is a file")
  if overwrite and path.is_dir() and any(path.iterdir()) and not _is_conversion(path):
    # --overwrite deletes the folder: a training workdir, a pipeline folder
    # or a home directory given as DST would go with it
    held = sorted(p.name for p in path.iterdir())
    what = (
      "a training workdir" if (path / "checkpoints").is_dir() else f"it holds {', '.join(held[:4])}"
    )
    raise FileExistsError(
      f"{dst} is not a folder this command wrote ({what}); --overwrite replaces only an earlier "
      "conversion, an empty folder or a file: delete it yourself if you mean to, or choose "
      "another destination"
    )
  if not to_safetensors and path.exists() and not path.is_dir():
    raise FileExistsError(
      f"{dst} is a file; an Orbax destination is a directory (name it "
      "*.safetensors for a safetensors file)"
    )


def _is_conversion(path: pathlib.Path) -> bool:
  """Whether `path` holds what this command writes (its model.json)."""
  from mimdistill.interop.segmentation_conversion import FORMAT as SEGMENTOR_FORMAT

  try:
    record = json.loads((path / MODEL_JSON).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and record.get("format") in (FORMAT, SEGMENTOR_FORMAT)


def _write_converted_dir(
  dst: str, spec: ModelSpec, tensors: dict, source: dict, *, order: list[str], overwrite: bool
) -> None:
  import orbax.checkpoint as ocp

  final = pathlib.Path(dst).absolute()
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.with_name(final.name + f".partial-{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)
  try:
    # Official -> Flax one tensor at a time: each becomes an owned, contiguous
    # array in the Flax orientation and its source pages are dropped.
    variables: dict[str, Any] = {}
    learned = spec.pos_embed == "learned"
    for _name, path, value in iter_official_to_flax(
      _consume(tensors, list(tensors)), spec.names_layout, learned_pos_embed=learned
    ):
      node = variables
      for k in path[:-1]:
        node = node.setdefault(k, {})
      copy = np.array(value, order="C", copy=True)
      release(value)
      node[path[-1]] = copy
      del value
    with ocp.CheckpointManager(
      workdir_lib.checkpoint_dir(tmp),
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={"state": _handler()},
    ) as manager:
      # The layout of a train state's weights: {params, model_state: {fixed}}.
      state = {"params": variables.get("params", {})}
      if variables.get("fixed"):
        state["model_state"] = {"fixed": variables["fixed"]}
      manager.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
      manager.wait_until_finished()
    del variables, state
    model = {
      "width": spec.width,
      "depth": spec.depth,
      "num_heads": spec.num_heads,
      "patch_size": spec.patch_size,
      "image_size": spec.image_size,
      "mlp_ratio": spec.mlp_ratio,
      "in_chans": spec.in_chans,
    }
    if spec.dist_token:
      model["dist_token"] = True
    if spec.layer_scale:
      model["layer_scale"] = True
    workdir_lib.write_json(
      tmp, workdir_lib.CONFIG, {"config": {}, "signature": {"stage": "convert", "model": model}}
    )
    workdir_lib.write_json(
      tmp,
      workdir_lib.LINEAGE,
      {
        "stage": "convert",
        "parent": {"kind": source["src_kind"], "path": os.path.abspath(source["src"])},
      },
    )
    workdir_lib.write_json(
      tmp,
      MODEL_JSON,
      {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": spec.to_json(),
        "step": 0,
        "source": source,
        "tensor_order": order,
      },
    )
    if final.exists():
      if not overwrite and any(final.iterdir()):
        raise FileExistsError(f"{dst} appeared while converting; not replacing it")
      shutil.rmtree(final)
    os.rename(tmp, final)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
