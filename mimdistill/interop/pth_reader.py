"""Safe reader for PyTorch ``.pth`` checkpoints, without torch and without pickle code.

Official MAE / TinyMIM weights are distributed as ``torch.save`` files. Those are
zip archives holding a pickle (``<archive>/data.pkl``) that describes the object
tree, plus one raw little-endian byte blob per tensor storage
(``<archive>/data/<key>``). A pickle is a program: ``torch.load`` (and plain
``pickle.load``) will call any importable function the file names, so a ``.pth``
downloaded from the internet can run arbitrary code. This module therefore:

* unpickles ``data.pkl`` with a restricted :class:`pickle.Unpickler` whose
  ``find_class`` consults an ALLOW-LIST (tensor rebuild functions, storage types,
  ``OrderedDict``, ``argparse.Namespace``, numpy scalars, and the few builtins
  pickle protocol 2 needs for bytes/sets). Every other global raises
  :class:`UnsafeCheckpointError` at lookup time, i.e. before anything could be
  called. The allowed callables are our own re-implementations that validate
  their arguments; no torch / argparse / numpy code ever sees pickle data.
* rebuilds tensors as numpy arrays straight from the storage blobs, which are
  memory-mapped when possible (torch writes them uncompressed and 64-byte
  aligned), so multi-GB checkpoints are not read into memory twice.
* never imports torch.

Public API: :func:`load_pth`, :func:`read_pickle_tree`, :func:`summarize`,
:class:`PthCheckpoint`, :class:`PickledNamespace` and the exception classes.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import mmap as mmap_module
import os
import pickle
import re
import struct
import sys
import types
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
  "CheckpointNotFoundError",
  "CheckpointReadError",
  "CorruptCheckpointError",
  "LegacyFormatError",
  "NoTensorsFoundError",
  "PickledNamespace",
  "PthCheckpoint",
  "UnsafeCheckpointError",
  "load_pth",
  "read_pickle_tree",
  "summarize",
]

# Top-level keys that hold the model weights, in order of preference. Official
# MAE / TinyMIM / DeiT checkpoints use 'model'; many other repos use
# 'state_dict'; a few wrap the module itself under 'module'.
PREFERRED_KEYS = ("model", "state_dict", "module")

# DistributedDataParallel prefixes every parameter name with this.
DDP_PREFIX = "module."

_RESAVE_HINT = (
  "Re-download the file, or re-save it on a machine with torch: "
  "torch.save(torch.load(src, map_location='cpu'), dst)"
)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class CheckpointReadError(ValueError):
  """Base class: a ``.pth`` file could not be read. Messages name the file."""


class CheckpointNotFoundError(CheckpointReadError, FileNotFoundError):
  """The checkpoint path does not exist (also a FileNotFoundError)."""


class CorruptCheckpointError(CheckpointReadError):
  """Not a zip, truncated, failed CRC, malformed pickle, or a missing/short storage."""


class LegacyFormatError(CheckpointReadError):
  """The file uses the pre-1.6 (non-zip) torch.save format, which is not supported."""


class NoTensorsFoundError(CheckpointReadError):
  """The checkpoint was read but holds no state dict of tensors where expected."""


class UnsafeCheckpointError(CheckpointReadError):
  """The pickle references a global outside the allow-list; nothing was executed."""


# --------------------------------------------------------------------------
# Objects the restricted unpickler hands to the pickle machine.
#
# The pickle opcodes BUILD / APPEND / SETITEM act on whatever object is on the
# stack (setattr, __setstate__, .append, ...). To keep those from mutating our
# module-level helpers, every helper object is "frozen": __slots__ (no
# __dict__) plus a __setattr__ that refuses. Nothing here is callable except
# _SafeCallable, whose target functions validate their arguments.
# --------------------------------------------------------------------------


class _Frozen:
  __slots__ = ()

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is read-only (tried to set {name!r})")

  def __delattr__(self, name):
    raise AttributeError(f"{type(self).__name__} is read-only (tried to delete {name!r})")

  def _init(self, **fields):
    for name, value in fields.items():
      object.__setattr__(self, name, value)


class _SafeCallable(_Frozen):
  """An allow-listed global: one of our own functions, never the real one."""

  __slots__ = ("_fn", "qualname")

  def __init__(self, fn: Callable[..., Any], qualname: str):
    self._init(_fn=fn, qualname=qualname)

  def __call__(self, *args):
    # REDUCE / NEWOBJ only ever pass positional arguments.
    return self._fn(*args)

  def __repr__(self):
    return f"<safe stand-in for {self.qualname}>"


class _StorageType(_Frozen):
  """Stand-in for ``torch.FloatStorage`` & co. or a ``torch.float32``-style dtype."""

  __slots__ = ("qualname", "dtype_name")

  def __init__(self, qualname: str, dtype_name: str):
    self._init(qualname=qualname, dtype_name=dtype_name)

  def __repr__(self):
    return f"<{self.qualname} -> {self.dtype_name}>"


class _Storage(_Frozen):
  """A storage referenced by a persistent id, with its data (or why it has none)."""

  __slots__ = ("key", "entry", "dtype_name", "numel", "array", "error")
  __hash__ = None  # keep storages out of sets / dict keys

  def __init__(self, key, entry, dtype_name, numel, array, error):
    self._init(key=key, entry=entry, dtype_name=dtype_name, numel=numel, array=array, error=error)


class _BrokenTensor(_Frozen):
  """Placeholder for a tensor whose bytes are missing; reported with its path later.

  The rebuild function does not know the tensor's name (the dict key is set
  after the tensor is built), so instead of raising there we leave this
  marker and search the finished tree for it, to name e.g. ``model.cls_token``.
  """

  __slots__ = ("reason",)
  __hash__ = None

  def __init__(self, reason: str):
    self._init(reason=reason)


class _NumpyDtypeSpec(_Frozen):
  """Stand-in for ``numpy.dtype(code, align, copy)`` plus its BUILD state.

  Kept as a plain record (rather than a real ``np.dtype``) so no numpy code
  parses attacker-controlled state; only ``_numpy_scalar`` consumes it.
  """

  __slots__ = ("code", "byteorder")

  def __init__(self, code: str):
    self._init(code=code, byteorder="=")

  def __setstate__(self, state):
    # numpy's state: (version, byteorder, subarray, names, fields, elsize,
    # alignment, flags[, metadata]). Only plain scalar dtypes are accepted.
    if (
      not isinstance(state, tuple)
      or len(state) < 5
      or state[1] not in ("<", ">", "|", "=")
      or any(s is not None for s in state[2:5])
    ):
      raise UnsafeCheckpointError(
        f"numpy dtype {self.code!r} has an unsupported pickled state {state!r:.200}; "
        "only plain numeric/bool dtypes are allowed in checkpoints"
      )
    self._init(byteorder=state[1])

  def to_numpy(self) -> np.dtype:
    dtype = np.dtype(self.code)
    return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class _FrozenMeta(type):
  # A class returned by find_class sits on the pickle stack, where BUILD could
  # setattr on the class object itself; refuse so the class stays as written.
  def __setattr__(cls, name, value):
    raise AttributeError(f"{cls.__name__} is read-only (tried to set {name!r})")

  def __delattr__(cls, name):
    raise AttributeError(f"{cls.__name__} is read-only (tried to delete {name!r})")


class PickledNamespace(types.SimpleNamespace, metaclass=_FrozenMeta):
  """What an ``argparse.Namespace`` in a checkpoint becomes: a plain attribute record.

  The pickle builds it with NEWOBJ (``cls.__new__(cls)``) then BUILD with a
  dict of fields; we only accept str-keyed dicts and set attributes, so no
  argparse code runs. ``vars(ns)`` gives the fields as a dict.
  """

  def __setstate__(self, state):
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise CorruptCheckpointError(
        f"argparse.Namespace state must be a dict with str keys, got {type(state).__name__}"
      )
    self.__dict__.update(state)


# --------------------------------------------------------------------------
# Safe re-implementations of the allowed globals.
# --------------------------------------------------------------------------


def _int_tuple(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    raise CorruptCheckpointError(f"tensor {what} must be a tuple of ints, got {value!r:.200}")
  return tuple(value)


def _is_c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  expected = 1
  for dim, step in zip(reversed(size), reversed(stride)):
    if dim != 1 and step != expected:  # a size-1 dim's stride is irrelevant
      return False
    expected *= dim
  return True


def _tensor_from_storage(storage, storage_offset, size, stride):
  """numpy equivalent of ``torch.empty(0).set_(storage, offset, size, stride)``."""
  if not isinstance(storage, _Storage):
    raise CorruptCheckpointError(
      f"tensor rebuild expected a storage as first argument, got {type(storage).__name__}"
    )
  if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
    raise CorruptCheckpointError(
      f"tensor storage offset must be an int >= 0, got {storage_offset!r:.100}"
    )
  size = _int_tuple(size, "size")
  stride = _int_tuple(stride, "stride")
  if len(size) != len(stride) or any(d < 0 for d in size) or any(s < 0 for s in stride):
    raise CorruptCheckpointError(f"tensor has invalid size {size} / stride {stride}")
  if storage.error is not None:
    return _BrokenTensor(storage.error)
  arr = storage.array
  numel = math.prod(size)
  if numel == 0:
    return np.empty(size, dtype=arr.dtype)
  last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
  if last >= storage.numel:
    return _BrokenTensor(
      f"it needs element {last} of storage {storage.key!r} (entry {storage.entry!r}) "
      f"but that storage has only {storage.numel} elements (size {size}, stride {stride}, "
      f"offset {storage_offset})"
    )
  if _is_c_contiguous(size, stride):
    # Common case: a zero-copy view (into the memory-mapped file when mmap=True).
    return arr[storage_offset : storage_offset + numel].reshape(size)
  # Transposed / sliced / expanded tensors: build the strided view, then copy
  # so callers always get an ordinary C-contiguous array.
  view = np.lib.stride_tricks.as_strided(
    arr[storage_offset:],
    shape=size,
    strides=tuple(s * arr.itemsize for s in stride),
    writeable=False,
  )
  return np.ascontiguousarray(view)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  # requires_grad / hooks / metadata (python attributes) have no numpy meaning.
  del requires_grad, backward_hooks, metadata
  return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  # nn.Parameter(tensor): the parameter is just its tensor for our purposes.
  del requires_grad, backward_hooks
  if not isinstance(data, (np.ndarray, _BrokenTensor)):
    raise CorruptCheckpointError(f"_rebuild_parameter expected a tensor, got {type(data).__name__}")
  return data


# Plain numeric dtype codes as numpy pickles them (e.g. 'f8', 'i8', 'b1').
_NUMPY_DTYPE_CODE = re.compile(r"^(b1|[iu](1|2|4|8)|f(2|4|8)|c(8|16))$")


def _numpy_dtype(code, align=False, copy=False):
  del align, copy
  if not isinstance(code, str) or not _NUMPY_DTYPE_CODE.match(code):
    raise UnsafeCheckpointError(
      f"numpy dtype {code!r:.100} is not allowed; only plain numeric/bool dtypes "
      "(e.g. 'f4', 'i8', 'b1') may appear in a checkpoint"
    )
  return _NumpyDtypeSpec(code)


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, _NumpyDtypeSpec) or not isinstance(data, (bytes, bytearray)):
    raise CorruptCheckpointError(
      f"numpy scalar needs (dtype, bytes), got ({type(dtype).__name__}, {type(data).__name__})"
    )
  np_dtype = dtype.to_numpy()
  if len(data) != np_dtype.itemsize:
    raise CorruptCheckpointError(
      f"numpy scalar of dtype {np_dtype} needs {np_dtype.itemsize} bytes, got {len(data)}"
    )
  return np.frombuffer(bytes(data), dtype=np_dtype)[0]


def _codecs_encode(text, encoding="utf-8", errors="strict"):
  # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
    raise CorruptCheckpointError(
      f"_codecs.encode is only allowed as encode(str, 'latin1'), got encoding {encoding!r:.50}"
    )
  return text.encode("latin1")


def _bytes(*args):
  if args and not (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
    raise CorruptCheckpointError("bytes() in a checkpoint may only take a bytes argument")
  return bytes(*args)


def _bytearray(*args):
  if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
    return bytearray(args[0].encode("latin1"))
  if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
    raise CorruptCheckpointError(
      "bytearray() in a checkpoint may only take bytes or (str, 'latin-1')"
    )
  return bytearray(*args)


def _container(kind):
  def build(items=()):
    if not isinstance(items, (list, tuple, set, frozenset)):
      raise CorruptCheckpointError(f"{kind.__name__}() expects a list, got {type(items).__name__}")
    return kind(items)

  return build


def _complex(real=0.0, imag=0.0):
  if not all(isinstance(v, (int, float)) for v in (real, imag)):
    raise CorruptCheckpointError("complex() in a checkpoint may only take numbers")
  return complex(real, imag)


# Storage classes and torch dtypes -> dtype names. Names are resolved to numpy
# dtypes lazily (bfloat16 needs ml_dtypes).
_STORAGE_CLASSES = {
  "FloatStorage": "float32",
  "DoubleStorage": "float64",
  "HalfStorage": "float16",
  "BFloat16Storage": "bfloat16",
  "LongStorage": "int64",
  "IntStorage": "int32",
  "ShortStorage": "int16",
  "CharStorage": "int8",
  "ByteStorage": "uint8",
  "BoolStorage": "bool",
  "ComplexFloatStorage": "complex64",
  "ComplexDoubleStorage": "complex128",
  # torch.save writes an untyped storage's persistent id with numel in bytes.
  "UntypedStorage": "uint8",
}
_TORCH_DTYPES = {
  "float32": "float32",
  "float": "float32",
  "float64": "float64",
  "double": "float64",
  "float16": "float16",
  "half": "float16",
  "bfloat16": "bfloat16",
  "int64": "int64",
  "long": "int64",
  "int32": "int32",
  "int": "int32",
  "int16": "int16",
  "short": "int16",
  "int8": "int8",
  "uint8": "uint8",
  "bool": "bool",
  "complex64": "complex64",
  "cfloat": "complex64",
  "complex128": "complex128",
  "cdouble": "complex128",
}


def _build_allow_list() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _SafeCallable(
      _rebuild_tensor_v2, "torch._utils._rebuild_tensor_v2"
    ),
    ("torch._utils", "_rebuild_tensor"): _SafeCallable(
      _rebuild_tensor, "torch._utils._rebuild_tensor"
    ),
    ("torch._utils", "_rebuild_parameter"): _SafeCallable(
      _rebuild_parameter, "torch._utils._rebuild_parameter"
    ),
    # The real OrderedDict is harmless: its constructor only iterates
    # already-unpickled data, and BUILD on it just sets instance attributes
    # (torch stores the state dict's `_metadata` that way).
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): PickledNamespace,
    ("numpy", "dtype"): _SafeCallable(_numpy_dtype, "numpy.dtype"),
    ("numpy.core.multiarray", "scalar"): _SafeCallable(
      _numpy_scalar, "numpy.core.multiarray.scalar"
    ),
    ("numpy._core.multiarray", "scalar"): _SafeCallable(
      _numpy_scalar, "numpy._core.multiarray.scalar"
    ),
    # Needed by pickle protocol 2 itself for bytes, sets and complex numbers.
    ("_codecs", "encode"): _SafeCallable(_codecs_encode, "_codecs.encode"),
    ("builtins", "bytes"): _SafeCallable(_bytes, "builtins.bytes"),
    ("builtins", "bytearray"): _SafeCallable(_bytearray, "builtins.bytearray"),
    ("builtins", "set"): _SafeCallable(_container(set), "builtins.set"),
    ("builtins", "frozenset"): _SafeCallable(_container(frozenset), "builtins.frozenset"),
    ("builtins", "complex"): _SafeCallable(_complex, "builtins.complex"),
  }
  for name, dtype_name in _STORAGE_CLASSES.items():
    allowed[("torch", name)] = _StorageType(f"torch.{name}", dtype_name)
  for name, dtype_name in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _StorageType(f"torch.{name}", dtype_name)
  return allowed


_ALLOWED_GLOBALS = _build_allow_list()

# Python-2-era module names that protocol-2 pickles use; the default
# find_class maps them, but an overriding find_class receives them raw.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _numpy_dtype_for(dtype_name: str) -> np.dtype:
  if dtype_name == "bfloat16":
    try:
      import ml_dtypes  # installed with jax
    except ImportError as exc:  # pragma: no cover - ml_dtypes ships with jax
      raise CheckpointReadError(
        "this checkpoint holds bfloat16 tensors, which need the ml_dtypes package; "
        "install it with `pip install ml_dtypes`"
      ) from exc
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype_name)


# --------------------------------------------------------------------------
# Archive access
# --------------------------------------------------------------------------

_ZIP_LOCAL_HEADER = b"PK\x03\x04"
_ZIP_LOCAL_HEADER_SIZE = 30
# torch.save's legacy format starts with pickle.dumps(MAGIC_NUMBER, protocol=2).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_READ_CHUNK = 1 << 24


def _fspath(path) -> str:
  try:
    return os.fspath(path)
  except TypeError as exc:
    raise TypeError(
      f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}"
    ) from exc


def _sniff(path: str, size: int) -> None:
  """Raise a precise error for files that are not torch zip checkpoints."""
  with open(path, "rb") as f:
    head = f.read(512)
  if head.startswith(_ZIP_LOCAL_HEADER):
    return
  if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:32]:
    raise LegacyFormatError(
      f"{path!r} is in the legacy torch.save format (torch < 1.6, not a zip archive), "
      "which this reader does not support. Re-save it on a machine with torch "
      "(any version >= 1.6 writes the zip format): "
      "torch.save(torch.load(old_path, map_location='cpu'), new_path)"
    )
  if len(head) >= 262 and head[257:262] == b"ustar":
    raise LegacyFormatError(
      f"{path!r} is a tar archive: the very old torch.save format (torch < 0.4?), "
      "which this reader does not support. Re-save it on a machine with torch: "
      "torch.save(torch.load(old_path, map_location='cpu'), new_path)"
    )
  if len(head) >= 9 and head[8:9] == b"{":
    hint = "it looks like a safetensors file; read it with the safetensors package instead"
  elif head.startswith(b"\x80"):
    hint = (
      "it looks like a bare pickle (pickle.dump), not a torch.save archive; "
      "reading it would mean executing it, so it is not supported"
    )
  else:
    hint = "it is not a torch.save checkpoint, or it is corrupt. " + _RESAVE_HINT
  raise CorruptCheckpointError(
    f"{path!r} is not a zip archive (size {size} bytes, first bytes {head[:8]!r}): {hint}"
  )


class _Archive:
  """An open torch.save zip: the data.pkl bytes and access to storage blobs."""

  def __init__(self, path: str, use_mmap: bool):
    self.path = path
    if not os.path.exists(path):
      raise CheckpointNotFoundError(
        f"no checkpoint file at {path!r} (absolute: {os.path.abspath(path)!r}); "
        "check the path, or download the weights first"
      )
    if os.path.isdir(path):
      raise CheckpointReadError(
        f"{path!r} is a directory, not a .pth file; pass the checkpoint file inside it "
        "(a torch.save zip such as 'mae_pretrain_vit_large.pth')"
      )
    size = os.path.getsize(path)
    if size == 0:
      raise CorruptCheckpointError(f"{path!r} is empty (0 bytes). " + _RESAVE_HINT)
    _sniff(path, size)
    try:
      self.zip = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
      raise CorruptCheckpointError(
        f"{path!r} starts like a zip archive but cannot be opened ({exc}); it is probably "
        f"truncated (an interrupted download or save?) or corrupt: size {size} bytes. "
        + _RESAVE_HINT
      ) from exc
    try:
      self.entries = {info.filename: info for info in self.zip.infolist()}
      self.prefix = self._find_prefix()
      self.byteorder = self._read_byteorder()
      self.mm = self._map(use_mmap, size)
    except BaseException:
      self.zip.close()
      raise

  def close(self) -> None:
    # The mmap is deliberately left open: the returned arrays are views into
    # it and keep it alive; it is released when the last array goes away.
    self.zip.close()

  def _find_prefix(self) -> str:
    # torch writes every record under one top directory ("<stem>/" or
    # "archive/"); data.pkl in it is the entry point.
    candidates = [
      name[: -len("data.pkl")]
      for name in self.entries
      if name.endswith("/data.pkl") and name.count("/") == 1
    ]
    if len(candidates) != 1:
      listing = ", ".join(sorted(self.entries)[:10]) or "(none)"
      what = "no" if not candidates else "several"
      raise CorruptCheckpointError(
        f"{self.path!r} is a zip archive but has {what} '<archive>/data.pkl' record(s), "
        f"so it is not a torch.save checkpoint (entries: {listing}). " + _RESAVE_HINT
      )
    return candidates[0]

  def _read_byteorder(self) -> str:
    name = self.prefix + "byteorder"
    if name not in self.entries:
      return "little"  # torch 1.6-1.x files had no record; they are little-endian
    value = self._read_entry(name).decode("ascii", "replace").strip()
    if value not in ("little", "big"):
      raise CorruptCheckpointError(
        f"{self.path!r}: record {name!r} holds {value!r:.40}, expected 'little' or 'big'. "
        + _RESAVE_HINT
      )
    return value

  def _map(self, use_mmap: bool, size: int):
    if not use_mmap:
      return None
    try:
      with open(self.path, "rb") as f:
        return mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ)
    except (OSError, ValueError):
      return None  # e.g. a filesystem without mmap support: read entries instead

  def _read_entry(self, name: str) -> bytes:
    try:
      return self.zip.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
      raise CorruptCheckpointError(
        f"{self.path!r}: record {name!r} is corrupt ({exc}); the file was damaged in "
        "transfer or on disk. " + _RESAVE_HINT
      ) from exc

  def read_pickle_bytes(self) -> bytes:
    return self._read_entry(self.prefix + "data.pkl")

  def load_storage(self, key: str, dtype_name: str, numel: int) -> _Storage:
    """Return the storage's 1-D native-endian array, or a _Storage carrying the error."""
    entry = f"{self.prefix}data/{key}"

    def broken(reason: str) -> _Storage:
      return _Storage(key, entry, dtype_name, numel, None, reason)

    info = self.entries.get(entry)
    if info is None:
      return broken(f"its storage record {entry!r} is missing from the zip archive")
    dtype = _numpy_dtype_for(dtype_name)
    nbytes = numel * dtype.itemsize
    if info.file_size < nbytes:
      return broken(
        f"its storage record {entry!r} has {info.file_size} bytes but "
        f"{numel} x {dtype_name} needs {nbytes}"
      )
    if numel == 0:
      return _Storage(key, entry, dtype_name, 0, np.empty(0, dtype), None)
    array = self._mapped_view(info, dtype, numel)
    if array is None:
      array = self._read_array(info, dtype, numel)
      if isinstance(array, str):
        return broken(array)
    if self.byteorder != sys.byteorder and dtype.itemsize > 1:
      array = array.byteswap()  # copy in native order; rare (big-endian writers)
    return _Storage(key, entry, dtype_name, numel, array, None)

  def _mapped_view(self, info: zipfile.ZipInfo, dtype: np.dtype, numel: int):
    """Zero-copy view into the mmap for stored (uncompressed) entries, else None."""
    if (
      self.mm is None
      or info.compress_type != zipfile.ZIP_STORED
      or info.flag_bits & 0x1
      or info.compress_size != info.file_size
    ):
      return None
    # The central directory gives the local header's offset; the data
    # follows the 30-byte header, the file name and the local extra field
    # (which torch uses as padding to 64-byte-align the data).
    start = info.header_offset
    header = self.mm[start : start + _ZIP_LOCAL_HEADER_SIZE]
    if len(header) < _ZIP_LOCAL_HEADER_SIZE or header[:4] != _ZIP_LOCAL_HEADER:
      return None  # let the zipfile path produce the precise error
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    data_start = start + _ZIP_LOCAL_HEADER_SIZE + name_len + extra_len
    if data_start + numel * dtype.itemsize > len(self.mm):
      return None
    return np.frombuffer(self.mm, dtype=dtype, count=numel, offset=data_start)

  def _read_array(self, info: zipfile.ZipInfo, dtype: np.dtype, numel: int):
    """Read an entry into a fresh writable array (CRC-checked); error text on failure."""
    buf = np.empty(info.file_size, dtype=np.uint8)
    view = memoryview(buf)
    pos = 0
    try:
      with self.zip.open(info) as f:
        while pos < info.file_size:
          chunk = f.read(min(_READ_CHUNK, info.file_size - pos))
          if not chunk:
            break
          view[pos : pos + len(chunk)] = chunk
          pos += len(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
      return f"its storage record {info.filename!r} is corrupt ({exc})"
    if pos < info.file_size:
      return f"its storage record {info.filename!r} ends after {pos} of {info.file_size} bytes"
    return buf[: numel * dtype.itemsize].view(dtype)


# --------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves globals only from the allow-list.

  ``find_class`` is the only way a pickle can obtain a callable (GLOBAL,
  STACK_GLOBAL, INST, OBJ and the EXT* opcodes all go through it), so
  refusing there means REDUCE / NEWOBJ can only ever call our stand-ins.
  """

  def __init__(self, data: bytes, archive: _Archive):
    # encoding='utf-8' matches torch.load for py2-era str records.
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self._archive = archive
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    module_name = _MODULE_ALIASES.get(module, module)
    allowed = _ALLOWED_GLOBALS.get((module_name, name))
    if allowed is None:
      qualname = f"{module}.{name}"
      if len(qualname) > 200:
        qualname = qualname[:200] + "..."
      raise UnsafeCheckpointError(
        f"refusing to load {self._archive.path!r}: its pickle references the global "
        f"'{qualname}', which is not on this reader's allow-list. The file was NOT "
        "executed (nothing in it was called). Only tensors, storages and plain "
        "containers (dict, list, tuple, OrderedDict, argparse.Namespace, numpy scalars) "
        "are allowed. If you trust the file, load it with torch elsewhere and re-save "
        "just the weights: torch.save({'model': state_dict}, 'clean.pth')"
      )
    return allowed

  def persistent_load(self, pid):
    # torch >= 1.6: ('storage', storage_type, key, location, numel).
    if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
      raise CorruptCheckpointError(
        f"{self._archive.path!r}: unsupported persistent id {pid!r:.200}; only torch "
        "storages ('storage', type, key, location, numel) are understood"
      )
    _, storage_type, key, _location, numel = pid
    if isinstance(key, bytes):
      key = key.decode("ascii", "replace")
    if not isinstance(storage_type, _StorageType):
      raise CorruptCheckpointError(
        f"{self._archive.path!r}: storage {key!r:.50} has type {storage_type!r:.100}, "
        "expected a torch storage class or dtype"
      )
    if (
      not isinstance(key, str)
      or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key)
      or not isinstance(numel, int)
      or isinstance(numel, bool)
      or numel < 0
    ):
      raise CorruptCheckpointError(
        f"{self._archive.path!r}: malformed storage reference (key {key!r:.50}, "
        f"numel {numel!r:.50})"
      )
    cached = self._storages.get(key)
    if cached is not None:
      if cached.dtype_name != storage_type.dtype_name or cached.numel != numel:
        raise CorruptCheckpointError(
          f"{self._archive.path!r}: storage {key!r} is referenced both as "
          f"{cached.numel} x {cached.dtype_name} and {numel} x {storage_type.dtype_name}; "
          "torch.save never writes that, so the file is corrupt"
        )
      return cached
    storage = self._archive.load_storage(key, storage_type.dtype_name, numel)
    self._storages[key] = storage
    return storage


def _find_broken(tree) -> tuple[str, _BrokenTensor] | None:
  """Depth-first search for a _BrokenTensor; returns its dotted path (cycle-safe)."""
  stack: list[tuple[str, Any]] = [("", tree)]
  seen: set[int] = set()
  while stack:
    path, obj = stack.pop()
    if isinstance(obj, _BrokenTensor):
      return path or "<top level>", obj
    if isinstance(obj, (dict, list, tuple, PickledNamespace)):
      if id(obj) in seen:
        continue
      seen.add(id(obj))
      if isinstance(obj, PickledNamespace):
        items = vars(obj).items()
      elif isinstance(obj, dict):
        items = obj.items()
      else:
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
      for k, v in items:
        k = str(k)
        sep = "" if not path or k.startswith("[") else "."
        stack.append((f"{path}{sep}{k}", v))
  return None


def _read_tree(path, use_mmap: bool, unpickler: type | None = None):
  # `unpickler`: a subclass of _RestrictedUnpickler with a wider allow-list
  # (interop.torchscript_reader); the default is the plain .pth reader's.
  path = _fspath(path)
  archive = _Archive(path, use_mmap)
  try:
    data = archive.read_pickle_bytes()
    try:
      tree = (unpickler or _RestrictedUnpickler)(data, archive).load()
    except CheckpointReadError:
      raise
    except (RecursionError, MemoryError) as exc:
      raise CorruptCheckpointError(
        f"{path!r}: data.pkl is too deeply nested or too large to read "
        f"({type(exc).__name__}); the file is corrupt or hostile"
      ) from exc
    except Exception as exc:  # malformed pickle: many exception types are possible
      raise CorruptCheckpointError(
        f"{path!r}: its data.pkl record could not be unpickled "
        f"({type(exc).__name__}: {exc}); the file is truncated or corrupt. " + _RESAVE_HINT
      ) from exc
  finally:
    archive.close()
  broken = _find_broken(tree)
  if broken is not None:
    where, marker = broken
    raise CorruptCheckpointError(
      f"{path!r}: tensor {where!r} cannot be read: {marker.reason}. The file is "
      "incomplete or corrupt. " + _RESAVE_HINT
    )
  return tree


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@dataclasses.dataclass
class PthCheckpoint:
  """A state dict read from a ``.pth`` file.

  Attributes:
    path: the file read.
    tensors: parameter name -> array (numpy; bfloat16 via ml_dtypes). With
      ``mmap=True`` contiguous tensors are read-only views into the mapped
      file; use ``np.array(x)`` for a writable copy.
    source_key: top-level key the weights came from ('model', 'state_dict',
      'module', or the ``key`` asked for); None when the top level itself is
      the state dict.
    skipped: top-level keys not used (and non-tensor entries of the state
      dict, as '<source_key>.<name>') -> short description.
    metadata: information worth keeping from skipped keys: 'args' (the
      training argparse.Namespace as a dict) and scalar values such as 'epoch'.
    stripped_prefix: 'module.' when a DistributedDataParallel prefix was
      removed from every name, else None.
  """

  path: str
  tensors: dict[str, np.ndarray]
  source_key: str | None
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
  stripped_prefix: str | None = None


def read_pickle_tree(path, *, mmap: bool = True) -> Any:
  """Safely unpickle a whole ``.pth`` file: the object tree with tensors as numpy.

  Containers come back as dict / OrderedDict / list / tuple, an
  ``argparse.Namespace`` as :class:`PickledNamespace`. Raises
  :class:`UnsafeCheckpointError` if the pickle names any global outside the
  allow-list and :class:`CheckpointReadError` subclasses for other problems.
  """
  return _read_tree(path, mmap)


def _preview(names, limit: int = 6) -> str:
  names = [str(n) for n in names]
  shown = ", ".join(names[:limit])
  return shown + (", ..." if len(names) > limit else "")


def _describe(value) -> str:
  """One-line description of a skipped value, e.g. 'dict with 2 entries (state, param_groups)'."""
  if isinstance(value, np.ndarray):
    return f"tensor {value.dtype} {tuple(value.shape)}"
  if isinstance(value, PickledNamespace):
    return f"argparse.Namespace ({_preview(vars(value))})"
  if isinstance(value, dict):
    kind = "OrderedDict" if isinstance(value, collections.OrderedDict) else "dict"
    n = len(value)
    body = f" ({_preview(value)})" if n else ""
    return f"{kind} with {n} entr{'y' if n == 1 else 'ies'}{body}"
  if isinstance(value, (list, tuple, set, frozenset)):
    n = len(value)
    return f"{type(value).__name__} of {n} item{'' if n == 1 else 's'}"
  if isinstance(value, np.generic):  # before float: np.float64 subclasses float
    return f"numpy.{type(value).__name__} {value.item()!r}"
  if isinstance(value, (bool, int, float, complex)):
    return f"{type(value).__name__} {value!r}"
  if isinstance(value, str):
    return f"str {value[:60]!r}" + ("..." if len(value) > 60 else "")
  if isinstance(value, (bytes, bytearray)):
    return f"{type(value).__name__} of {len(value)} bytes"
  if value is None:
    return "None"
  return type(value).__name__


def _has_tensors(value) -> bool:
  return isinstance(value, dict) and any(isinstance(v, np.ndarray) for v in value.values())


def _metadata_value(value):
  if isinstance(value, PickledNamespace):
    return dict(vars(value))
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return None


def load_pth(path, *, mmap: bool = True, key: str | None = None) -> PthCheckpoint:
  """Read the model state dict of a ``torch.save`` checkpoint without torch.

  Args:
    path: the ``.pth`` file (torch >= 1.6 zip format).
    mmap: memory-map the file so contiguous tensors are zero-copy read-only
      views (storage blobs are then not CRC-checked, and the file must not be
      rewritten while the arrays are in use); with False every storage is
      read (and CRC-checked) into writable memory.
    key: top-level key holding the state dict. Default: the first of
      'model', 'state_dict', 'module' that holds tensors, else the top level
      itself if it maps names to tensors.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allow-list
      (nothing was executed).
    CheckpointNotFoundError, LegacyFormatError, CorruptCheckpointError,
    NoTensorsFoundError: all subclasses of CheckpointReadError (ValueError).
  """
  path = _fspath(path)
  tree = _read_tree(path, mmap)
  if not isinstance(tree, dict):
    raise NoTensorsFoundError(
      f"{path!r}: the top level is a {_describe(tree)}, not a dict, so no state dict "
      "was found; use read_pickle_tree() to inspect it"
    )
  top_keys = _preview(tree, limit=20) or "(none)"

  if key is not None:
    if key not in tree:
      raise NoTensorsFoundError(
        f"{path!r}: key {key!r} is not in the checkpoint; top-level keys: {top_keys}"
      )
    if not _has_tensors(tree[key]):
      raise NoTensorsFoundError(
        f"{path!r}: key {key!r} holds a {_describe(tree[key])}, not a state dict of "
        f"tensors; top-level keys: {top_keys}"
      )
    source_key = key
  else:
    source_key = next((k for k in PREFERRED_KEYS if k in tree and _has_tensors(tree[k])), None)
    if source_key is None and not any(isinstance(v, np.ndarray) for v in tree.values()):
      details = "; ".join(f"{k}: {_describe(v)}" for k, v in list(tree.items())[:20])
      raise NoTensorsFoundError(
        f"{path!r}: no tensors found under {', '.join(map(repr, PREFERRED_KEYS))} or at "
        f"the top level; top-level keys: {details or '(none)'}. If the weights are under "
        "another key, pass load_pth(path, key=...)"
      )

  state = tree[source_key] if source_key is not None else tree
  tensors: dict[str, np.ndarray] = {}
  skipped: dict[str, str] = {}
  metadata: dict[str, Any] = {}
  for name, value in state.items():
    if isinstance(value, np.ndarray):
      tensors[str(name)] = value
    else:
      # A flat top level is the state dict itself: list its extras plainly.
      skipped[str(name) if source_key is None else f"{source_key}.{name}"] = _describe(value)
  if source_key is not None:
    for name, value in tree.items():
      if name == source_key:
        continue
      skipped[str(name)] = _describe(value)
      # Some repos save vars(args) instead of the Namespace itself.
      kept = dict(value) if name == "args" and isinstance(value, dict) else _metadata_value(value)
      if kept is not None:
        metadata[str(name)] = kept

  stripped = None
  if tensors and all(name.startswith(DDP_PREFIX) for name in tensors):
    tensors = {name[len(DDP_PREFIX) :]: value for name, value in tensors.items()}
    stripped = DDP_PREFIX
  return PthCheckpoint(
    path=path,
    tensors=tensors,
    source_key=source_key,
    skipped=skipped,
    metadata=metadata,
    stripped_prefix=stripped,
  )


def summarize(ckpt: PthCheckpoint) -> str:
  """Human-readable listing of the tensors used and the keys skipped."""
  total = sum(int(v.size) for v in ckpt.tensors.values())
  nbytes = sum(int(v.nbytes) for v in ckpt.tensors.values())
  source = repr(ckpt.source_key) if ckpt.source_key is not None else "the top level"
  lines = [
    f"checkpoint {ckpt.path}",
    f"  weights from {source}: {len(ckpt.tensors)} tensors, {total:,} values, "
    f"{nbytes / 2**20:.2f} MiB",
  ]
  if ckpt.stripped_prefix:
    lines.append(f"  stripped prefix {ckpt.stripped_prefix!r} from every name")
  width = max((len(n) for n in ckpt.tensors), default=0)
  for name, value in ckpt.tensors.items():
    lines.append(f"    {name:<{width}}  {str(value.dtype):<8}  {tuple(value.shape)}")
  if ckpt.skipped:
    lines.append("  skipped:")
    for name, description in ckpt.skipped.items():
      lines.append(f"    {name}: {description}")
  else:
    lines.append("  skipped: nothing")
  return "\n".join(lines)
