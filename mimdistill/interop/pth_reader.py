"""Safe reader for PyTorch ``.pth`` checkpoints, without torch and without running pickle code.

A ``torch.save`` file (torch >= 1.6) is a zip archive: ``<archive>/data.pkl`` pickles the
object tree and every tensor storage is one raw record ``<archive>/data/<key>``. A pickle is
a program (``torch.load`` calls whatever function the file names), so this reader:

* unpickles ``data.pkl`` with a :class:`pickle.Unpickler` whose ``find_class`` answers only
  from an allow-list. Any other global raises :class:`UnsafeCheckpointError` when it is looked
  up, before anything could be called (GLOBAL, STACK_GLOBAL, INST, OBJ and EXT* all go through
  ``find_class``, so REDUCE / NEWOBJ can only call what it returned);
* answers with immutable stdlib types (``OrderedDict``, ``set``, ``frozenset``, ``complex``,
  which only iterate or convert already-unpickled values) or with a :class:`StandIn`, which
  runs none of the real code: calling one runs our re-implementation that validates its
  arguments (tensor and ``nn.Parameter`` rebuild, numpy scalars, the bytes helpers of pickle
  protocol 2); one without a re-implementation (``argparse.Namespace``, ``numpy.dtype``,
  torch storage types) only makes an inert record of what the pickle hands it;
* rebuilds tensors as numpy arrays over the storage records, memory-mapped when they are
  stored uncompressed (as torch writes them), and checks each record's zip CRC-32 as it is
  read, so bytes changed on disk are refused instead of converted;
* never imports torch.
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
import typing
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
  "PREFERRED_KEYS",
  "CheckpointNotFoundError",
  "CheckpointReadError",
  "CorruptCheckpointError",
  "LegacyFormatError",
  "NoTensorsFoundError",
  "PickledNamespace",
  "PthCheckpoint",
  "StandIn",
  "UnsafeCheckpointError",
  "load_pth",
  "read_pickle_tree",
  "stand_in",
  "summarize",
]

# Top-level keys that hold the model weights, in order of preference: official MAE / TinyMIM
# / DeiT checkpoints use 'model', mmcv and many repos 'state_dict', SparK 'module'.
PREFERRED_KEYS = ("model", "state_dict", "module")
DDP_PREFIX = "module."  # DistributedDataParallel prefixes every parameter name with this

_RESAVE_HINT = (
  "Re-download the file, or re-save it on a machine with torch: "
  "torch.save(torch.load(src, map_location='cpu'), dst)"
)


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
# The stand-in for allow-listed globals
# --------------------------------------------------------------------------


class StandIn:
  """What an allow-listed global is inside a checkpoint: a subclass named after it.

  ``find_class`` returns the subclass; all a pickle can do with a class is call it (REDUCE,
  NEWOBJ, INST and OBJ all end in ``cls.__new__``), use it as a token (a storage type in a
  persistent id: ``dtype_name``), or BUILD it:

  * with ``impl``, the call returns ``impl(*args)``, a function of this module that
    validates its arguments (e.g. the tensor rebuild); nothing of the real global runs;
  * without, it makes an inert record of the arguments (``_args``, only when
    ``takes_args``) and of the state BUILD gives it once (``_state``). A dict state's
    fields read as ``vars(record)`` and as attributes, e.g. an ``argparse.Namespace``'s.
  * BUILD on the class itself finds ``__setstate__`` unbound and calls it with one
    argument, a TypeError, so no pickle can set attributes on a stand-in class. Records
    have slots and no instance ``__dict__``, so BUILD always goes through ``__setstate__``
    (a field cannot shadow it). Fields hold only what the pickle put there, so reaching
    one through pickle's own attribute lookups (APPEND's ``append``) calls nothing that
    REDUCE could not.
  """

  __slots__ = ("_args", "_state")
  qualname: typing.ClassVar[str] = "StandIn"
  impl: typing.ClassVar[Any] = None
  takes_args: typing.ClassVar[bool] = False
  dtype_name: typing.ClassVar[str | None] = None

  def __new__(cls, *args):
    if cls.impl is not None:
      return cls.impl(*args)
    if args and not cls.takes_args:
      # A TypeError: the reader reports it as a corrupt data.pkl, naming the file.
      raise TypeError(f"{cls.qualname} is called with arguments {args!r:.100} in the pickle")
    record = object.__new__(cls)
    record._args, record._state = args, None
    return record

  def __setstate__(self, state):
    if self._state is not None:
      raise TypeError(f"{self.qualname} is given its state twice")
    self._state = state

  @property
  def __dict__(self):
    # vars(record): the fields, read-only; only a dict state has fields.
    state = self._state if isinstance(self._state, dict) else {}
    return types.MappingProxyType(state)

  def __getattr__(self, name):
    # Only called when normal lookup fails, i.e. never for the methods above.
    state = object.__getattribute__(self, "_state")
    if not name.startswith("__") and isinstance(state, dict) and name in state:
      return state[name]
    raise AttributeError(f"{self.qualname} record has no field {name!r}")

  def __repr__(self):
    return f"<{self.qualname} {self._state!r:.200}>"


def stand_in(qualname: str, impl=None, *, base: type = StandIn, **attrs) -> type:
  """The StandIn subclass for the global `qualname` (`attrs`: takes_args, dtype_name)."""
  body = {"__slots__": (), "qualname": qualname, **attrs}
  if impl is not None:
    body["impl"] = staticmethod(impl)
  return type(qualname.rsplit(".", 1)[-1], (base,), body)


# An argparse.Namespace (official training checkpoints save their `args`) comes back as this.
PickledNamespace = stand_in("argparse.Namespace")


# --------------------------------------------------------------------------
# Validated re-implementations of the allowed functions
# --------------------------------------------------------------------------


class _Storage(typing.NamedTuple):
  """A storage referenced by a persistent id: its 1-D array, or why it has none.

  A NamedTuple is immutable and has no ``__setstate__`` or ``__dict__``, so BUILD cannot
  change one; and the pickle cannot make one (the class is not on the allow-list).
  """

  key: str
  entry: str
  dtype_name: str
  numel: int
  array: np.ndarray | None
  error: str | None


class _Unreadable(typing.NamedTuple):
  """Left in the tree for a tensor whose bytes are missing or corrupt: the rebuild does not
  know the tensor's name (the dict key is set after), so the finished tree is searched for
  it to name e.g. ``model.cls_token``."""

  reason: str


def _ints(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
    type(v) is int and v >= 0
    for v in value  # bool is not a size
  ):
    raise CorruptCheckpointError(f"tensor {what} must be a tuple of ints >= 0, got {value!r:.200}")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
  """numpy equivalent of ``torch._utils._rebuild_tensor(_v2)``, i.e. of
  ``torch.empty(0).set_(storage, offset, size, stride)``; requires_grad, hooks and
  metadata (the v2 extras) have no numpy meaning."""
  if type(storage) is not _Storage:
    raise CorruptCheckpointError(
      f"tensor rebuild expected a storage as first argument, got {type(storage).__name__}"
    )
  (storage_offset,) = _ints((storage_offset,), "storage offset")
  size, stride = _ints(size, "size"), _ints(stride, "stride")
  if len(size) != len(stride):
    raise CorruptCheckpointError(f"tensor has size {size} but stride {stride}")
  if storage.error is not None:
    return _Unreadable(storage.error)
  arr = storage.array
  if math.prod(size) == 0:
    return np.empty(size, dtype=arr.dtype)
  last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
  if last >= storage.numel:
    return _Unreadable(
      f"it needs element {last} of storage {storage.key!r} (entry {storage.entry!r}) "
      f"but that storage has only {storage.numel} elements (size {size}, stride {stride}, "
      f"offset {storage_offset})"
    )
  # as_strided is safe here: the check above keeps every element inside the storage.
  view = np.lib.stride_tricks.as_strided(
    arr[storage_offset:], shape=size, strides=[s * arr.itemsize for s in stride], writeable=False
  )
  if view.flags.c_contiguous:
    # Zero-copy: a view into the memory-mapped file when mmap=True; the read path's own
    # buffer is writable.
    return arr[storage_offset : storage_offset + view.size].reshape(size)
  return np.ascontiguousarray(view)  # transposed / sliced tensors come back C-contiguous


def _rebuild_parameter(data, *_unused):
  """``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is just its tensor here."""
  if not isinstance(data, (np.ndarray, _Unreadable)):
    raise CorruptCheckpointError(f"_rebuild_parameter expected a tensor, got {type(data).__name__}")
  return data


# Plain numeric dtype codes as numpy pickles them (e.g. 'f8', 'i8', 'b1').
_NUMPY_CODE = re.compile(r"b1|[iu](1|2|4|8)|f(2|4|8)|c(8|16)")


def _numpy_scalar(dtype, data):
  """``numpy.core.multiarray.scalar(numpy.dtype(code, align, copy) + BUILD state, bytes)``.

  The dtype is an inert record whose code and byte order are checked here, so no numpy code
  parses pickle data: the real ``numpy.dtype(code, align, copy=False)`` returns numpy's
  shared builtin dtype object, on which BUILD would then run numpy's ``__setstate__``.
  """
  code, state = None, None
  if type(dtype) is _NumpyDtype and dtype._args:
    code, state = dtype._args[0], dtype._state
  if not isinstance(code, str) or not _NUMPY_CODE.fullmatch(code):
    raise UnsafeCheckpointError(
      f"numpy dtype {code!r:.100} is not allowed; only plain numeric/bool dtypes "
      "(e.g. 'f4', 'i8', 'b1') may appear in a checkpoint"
    )
  # numpy's state: (version, byteorder, subarray, names, fields, ...); only plain dtypes.
  order = state[1] if isinstance(state, tuple) and len(state) >= 5 else None
  if order not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5]):
    raise UnsafeCheckpointError(f"numpy dtype {code!r} has an unsupported state {state!r:.200}")
  np_dtype = np.dtype(code).newbyteorder(order if order in "<>" else "=")
  if not isinstance(data, (bytes, bytearray)) or len(data) != np_dtype.itemsize:
    raise CorruptCheckpointError(
      f"numpy scalar of dtype {np_dtype} needs {np_dtype.itemsize} bytes"
    )
  return np.frombuffer(bytes(data), dtype=np_dtype)[0]


def _codecs_encode(text, encoding, *errors):
  # Protocol 2 stores bytes as _codecs.encode(str, 'latin1'); other codecs could decompress.
  if (
    not isinstance(text, str)
    or encoding not in ("latin1", "latin-1")
    or errors not in ((), ("strict",))
  ):
    raise CorruptCheckpointError("_codecs.encode is only allowed as encode(str, 'latin1')")
  return text.encode("latin1")


def _bytes(*args):
  # bytes() / bytes(b'...'): bytes(n) would allocate n bytes.
  if args and not (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
    raise CorruptCheckpointError("bytes() in a checkpoint may only take a bytes argument")
  return bytes(*args)


def _bytearray(*args):
  # Protocol 2 stores a bytearray as bytearray(str, 'latin-1').
  if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
    return bytearray(args[0].encode("latin1"))
  if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray))):
    raise CorruptCheckpointError(
      "bytearray() in a checkpoint may only take bytes or (str, 'latin-1')"
    )
  return bytearray(*args)


_NumpyDtype = stand_in("numpy.dtype", takes_args=True)

# torch storage classes (torch.save's persistent ids) and torch dtypes -> numpy dtype names.
_STORAGE_DTYPES = {
  "Float": "float32",
  "Double": "float64",
  "Half": "float16",
  "BFloat16": "bfloat16",
  "Long": "int64",
  "Int": "int32",
  "Short": "int16",
  "Char": "int8",
  "Byte": "uint8",
  "Bool": "bool",
  "ComplexFloat": "complex64",
  "ComplexDouble": "complex128",
  "Untyped": "uint8",  # an untyped storage's numel counts bytes
}
_TORCH_DTYPES = {
  **{name: name for name in set(_STORAGE_DTYPES.values())},
  **{"float": "float32", "double": "float64", "half": "float16", "long": "int64"},
  **{"int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128"},
}

_ALLOWED: dict[tuple[str, str], type] = {
  ("torch._utils", "_rebuild_tensor_v2"): stand_in(
    "torch._utils._rebuild_tensor_v2", _rebuild_tensor
  ),
  ("torch._utils", "_rebuild_tensor"): stand_in("torch._utils._rebuild_tensor", _rebuild_tensor),
  ("torch._utils", "_rebuild_parameter"): stand_in(
    "torch._utils._rebuild_parameter", _rebuild_parameter
  ),
  # BUILD on a real OrderedDict only sets instance attributes (torch's state dict `_metadata`).
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("argparse", "Namespace"): PickledNamespace,
  ("numpy", "dtype"): _NumpyDtype,
  ("numpy.core.multiarray", "scalar"): stand_in("numpy.core.multiarray.scalar", _numpy_scalar),
  ("numpy._core.multiarray", "scalar"): stand_in("numpy._core.multiarray.scalar", _numpy_scalar),
  # What pickle protocol 2 itself needs for bytes, sets and complex numbers.
  ("_codecs", "encode"): stand_in("_codecs.encode", _codecs_encode),
  ("builtins", "bytes"): stand_in("builtins.bytes", _bytes),
  ("builtins", "bytearray"): stand_in("builtins.bytearray", _bytearray),
  ("builtins", "set"): set,
  ("builtins", "frozenset"): frozenset,
  ("builtins", "complex"): complex,
  **{
    ("torch", f"{k}Storage"): stand_in(f"torch.{k}Storage", dtype_name=v)
    for k, v in _STORAGE_DTYPES.items()
  },
  **{("torch", k): stand_in(f"torch.{k}", dtype_name=v) for k, v in _TORCH_DTYPES.items()},
}

# Protocol-2 pickles name builtins '__builtin__'; an overriding find_class receives it raw.
_MODULE_ALIASES = {"__builtin__": "builtins"}


# --------------------------------------------------------------------------
# Archive access
# --------------------------------------------------------------------------

_LOCAL_HEADER = b"PK\x03\x04"
# torch.save's legacy format starts with pickle.dumps(MAGIC_NUMBER, protocol=2).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_CHUNK = 1 << 24


def _not_a_zip(path: str, size: int) -> CheckpointReadError:
  """A precise error for a file that does not start like a zip archive."""
  with open(path, "rb") as f:
    head = f.read(32)
  if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
    return LegacyFormatError(
      f"{path!r} is in the legacy torch.save format (torch < 1.6, not a zip archive), "
      "which this reader does not support. Re-save it on a machine with torch "
      "(any version >= 1.6 writes the zip format): "
      "torch.save(torch.load(old_path, map_location='cpu'), new_path)"
    )
  if head[8:9] == b"{":
    hint = "it looks like a safetensors file; read it with the safetensors package instead"
  elif head.startswith(b"\x80"):
    hint = (
      "it looks like a bare pickle (pickle.dump), not a torch.save archive; "
      "reading it would mean executing it, so it is not supported"
    )
  else:
    hint = "it is not a torch.save checkpoint, or it is corrupt. " + _RESAVE_HINT
  return CorruptCheckpointError(
    f"{path!r} is not a zip archive (size {size} bytes, first bytes {head[:8]!r}): {hint}"
  )


class _Archive:
  """An open torch.save zip: its records, CRC-checked as they are read."""

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
    with open(path, "rb") as f:
      if f.read(4) != _LOCAL_HEADER:
        raise _not_a_zip(path, size)
      try:
        # The map is never closed: the arrays are views into it and keep it alive.
        self.mm = (
          mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_READ) if use_mmap else None
        )
      except (OSError, ValueError):
        self.mm = None  # a filesystem without mmap: read the records instead
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
      # torch writes every record under one top folder ('<stem>/' or 'archive/').
      tops = [
        n[: -len("data.pkl")] for n in self.entries if n.endswith("/data.pkl") and n.count("/") == 1
      ]
      if len(tops) != 1:
        listing = ", ".join(sorted(self.entries)[:10]) or "(none)"
        raise CorruptCheckpointError(
          f"{path!r} is a zip archive but has {'several' if tops else 'no'} "
          f"'<archive>/data.pkl' record(s), so it is not a torch.save checkpoint "
          f"(entries: {listing}). " + _RESAVE_HINT
        )
      self.prefix = tops[0]
      self.byteorder = "little"  # torch 1.6-1.x wrote no record; they are little-endian
      if self.prefix + "byteorder" in self.entries:
        self.byteorder = self.read(self.prefix + "byteorder").decode("ascii", "replace").strip()
        if self.byteorder not in ("little", "big"):
          raise CorruptCheckpointError(
            f"{path!r}: record {self.prefix + 'byteorder'!r} holds {self.byteorder!r:.40}, "
            "expected 'little' or 'big'. " + _RESAVE_HINT
          )
    except BaseException:
      self.zip.close()
      raise

  def read(self, name: str) -> bytes:
    """A whole small record; zipfile checks its CRC-32 as it reads."""
    try:
      return self.zip.read(name)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
      raise CorruptCheckpointError(
        f"{self.path!r}: record {name!r} is corrupt ({exc}); the file was damaged in "
        "transfer or on disk. " + _RESAVE_HINT
      ) from exc

  def storage(self, key: str, dtype_name: str, numel: int) -> _Storage:
    """The storage's 1-D native-endian array, or a _Storage carrying why it has none."""
    entry = f"{self.prefix}data/{key}"
    info = self.entries.get(entry)
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype_name == "bfloat16" else dtype_name)
    nbytes = numel * dtype.itemsize
    if info is None:
      error = f"its storage record {entry!r} is missing from the zip archive"
    elif info.file_size < nbytes:
      error = f"its storage record {entry!r} has {info.file_size} bytes but {numel} x {dtype_name} needs {nbytes}"
    else:
      mapped = self._mapped(info)
      data = self._read(info) if mapped is None else mapped
      error = data if isinstance(data, str) else None
    if error is not None:
      return _Storage(key, entry, dtype_name, numel, None, error)
    array = np.frombuffer(data, dtype=dtype, count=numel)
    if self.byteorder != sys.byteorder and dtype.itemsize > 1:
      array = array.byteswap()  # a native-order copy; only files from big-endian machines
    return _Storage(key, entry, dtype_name, numel, array, None)

  def _mapped(self, info: zipfile.ZipInfo):
    """A stored (uncompressed) record's bytes as a view of the mapped file, after checking
    its CRC-32 over them (the one read of those pages); None when not mapped or compressed."""
    if self.mm is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
      return None
    # zipfile has no API for where an entry's data starts: after the 30-byte local header,
    # the name and the local extra field (torch's padding to 64-byte-align the data).
    start = info.header_offset
    if self.mm[start : start + 4] != _LOCAL_HEADER:
      return None  # let zipfile's reader produce the precise error
    name_len, extra_len = struct.unpack("<HH", self.mm[start + 26 : start + 30])
    begin = start + 30 + name_len + extra_len
    if begin + info.file_size > len(self.mm):
      return None
    view = memoryview(self.mm)[begin : begin + info.file_size]
    crc = 0
    for pos in range(0, len(view), _CHUNK):
      crc = zlib.crc32(view[pos : pos + _CHUNK], crc)
    if crc != info.CRC:
      return (
        f"its storage record {info.filename!r} fails its CRC-32 check (the stored bytes "
        "were changed on disk or in transfer)"
      )
    return view

  def _read(self, info: zipfile.ZipInfo):
    """A record read into a fresh writable buffer (zipfile checks the CRC-32 as it reads
    the last chunk); the error text on failure."""
    buf = np.empty(info.file_size, np.uint8)  # numpy's allocator: huge pages, no zeroing
    view, pos = memoryview(buf), 0
    try:
      with self.zip.open(info) as f:
        while pos < info.file_size and (chunk := f.read(min(_CHUNK, info.file_size - pos))):
          view[pos : pos + len(chunk)] = chunk
          pos += len(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
      return f"its storage record {info.filename!r} is corrupt ({exc})"
    if pos < info.file_size:
      return f"its storage record {info.filename!r} ends after {pos} of {info.file_size} bytes"
    return buf


# --------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------


class _RestrictedUnpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves globals only from the allow-list (a subclass may widen
  ``find_class``, as interop.torchscript_reader does) and persistent ids only as storages."""

  def __init__(self, data: bytes, archive: _Archive):
    super().__init__(io.BytesIO(data), encoding="utf-8")  # as torch.load, for py2-era str
    self._archive = archive
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    allowed = _ALLOWED.get((_MODULE_ALIASES.get(module, module), name))
    if allowed is None:
      qualname = f"{module}.{name}"
      qualname = qualname if len(qualname) <= 200 else qualname[:200] + "..."
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
    path = self._archive.path
    if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
      raise CorruptCheckpointError(
        f"{path!r}: unsupported persistent id {pid!r:.200}; only torch storages "
        "('storage', type, key, location, numel) are understood"
      )
    _, storage_type, key, _location, numel = pid
    key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    if not (
      isinstance(storage_type, type)
      and issubclass(storage_type, StandIn)
      and storage_type.dtype_name
    ):
      raise CorruptCheckpointError(
        f"{path!r}: storage {key!r:.50} has type {storage_type!r:.100}, "
        "expected a torch storage class or dtype"
      )
    if (
      not (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.\-]+", key))
      or type(numel) is not int
      or numel < 0
    ):
      raise CorruptCheckpointError(
        f"{path!r}: malformed storage reference (key {key!r:.50}, numel {numel!r:.50})"
      )
    dtype_name = storage_type.dtype_name
    storage = self._storages.get(key)
    if storage is None:
      storage = self._storages[key] = self._archive.storage(key, dtype_name, numel)
    elif (storage.dtype_name, storage.numel) != (dtype_name, numel):
      raise CorruptCheckpointError(
        f"{path!r}: storage {key!r} is referenced both as {storage.numel} x "
        f"{storage.dtype_name} and {numel} x {dtype_name}; torch.save never writes that, "
        "so the file is corrupt"
      )
    return storage


def _find_unreadable(tree) -> tuple[str, _Unreadable] | None:
  """Depth-first search for an _Unreadable; returns its dotted path (cycle-safe)."""
  stack: list[tuple[str, Any]] = [("", tree)]
  seen: set[int] = set()
  while stack:
    path, obj = stack.pop()
    if isinstance(obj, _Unreadable):
      return path or "<top level>", obj
    if isinstance(obj, (dict, list, tuple, StandIn)) and id(obj) not in seen:
      seen.add(id(obj))
      if isinstance(obj, (dict, StandIn)):
        items = vars(obj).items() if isinstance(obj, StandIn) else obj.items()
      else:
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
      for k, v in items:
        k = str(k)
        stack.append((f"{path}{'' if not path or k.startswith('[') else '.'}{k}", v))
  return None


def _read_tree(path, use_mmap: bool, unpickler: type = _RestrictedUnpickler):
  path = os.fspath(path)
  archive = _Archive(path, use_mmap)
  try:
    data = archive.read(archive.prefix + "data.pkl")
    try:
      tree = unpickler(data, archive).load()
    except CheckpointReadError:
      raise
    except (RecursionError, MemoryError) as exc:
      raise CorruptCheckpointError(
        f"{path!r}: data.pkl is too deeply nested or too large to read "
        f"({type(exc).__name__}); the file is corrupt or hostile"
      ) from exc
    except Exception as exc:  # a malformed pickle can raise many exception types
      raise CorruptCheckpointError(
        f"{path!r}: its data.pkl record could not be unpickled "
        f"({type(exc).__name__}: {exc}); the file is truncated or corrupt. " + _RESAVE_HINT
      ) from exc
  finally:
    archive.zip.close()
  unreadable = _find_unreadable(tree)
  if unreadable is not None:
    where, marker = unreadable
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

  Containers come back as dict / OrderedDict / list / tuple, an ``argparse.Namespace`` as
  a :data:`PickledNamespace` record (``vars(ns)``, ``ns.lr``). Raises
  :class:`UnsafeCheckpointError` if the pickle names any global outside the allow-list
  and :class:`CheckpointReadError` subclasses for other problems.
  """
  return _read_tree(path, mmap)


def _preview(names, limit: int = 6) -> str:
  names = [str(n) for n in names]
  return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _describe(value) -> str:
  """One-line description of a skipped value, e.g. 'dict with 2 entries (state, param_groups)'."""
  if isinstance(value, np.ndarray):
    return f"tensor {value.dtype} {tuple(value.shape)}"
  if isinstance(value, StandIn):
    return f"{value.qualname} ({_preview(vars(value))})"
  if isinstance(value, dict):
    kind = "OrderedDict" if isinstance(value, collections.OrderedDict) else "dict"
    n = len(value)
    return f"{kind} with {n} entr{'y' if n == 1 else 'ies'}" + (
      f" ({_preview(value)})" if n else ""
    )
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
  return "None" if value is None else type(value).__name__


def _has_tensors(value) -> bool:
  return isinstance(value, dict) and any(isinstance(v, np.ndarray) for v in value.values())


def _metadata_value(name, value):
  if isinstance(value, PickledNamespace) or (name == "args" and isinstance(value, dict)):
    # Some repos save vars(args) instead of the Namespace.
    return dict(vars(value) if isinstance(value, PickledNamespace) else value)
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return None


def load_pth(path, *, mmap: bool = True, key: str | None = None) -> PthCheckpoint:
  """Read the model state dict of a ``torch.save`` checkpoint without torch.

  Args:
    path: the ``.pth`` file (torch >= 1.6 zip format).
    mmap: memory-map the file so contiguous tensors are zero-copy read-only views (the file
      must not be rewritten while they are in use); with False every storage is read into
      writable memory. Either way each storage record's CRC-32 is checked as it is read.
    key: top-level key holding the state dict. Default: the first of 'model', 'state_dict',
      'module' that holds tensors, else the top level itself if it maps names to tensors.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allow-list (nothing was
      executed).
    CheckpointNotFoundError, LegacyFormatError, CorruptCheckpointError, NoTensorsFoundError:
      all subclasses of CheckpointReadError (ValueError).
  """
  path = os.fspath(path)
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
    if source_key is None and not _has_tensors(tree):
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
    else:  # a flat top level is the state dict itself: its extras are listed plainly
      skipped[str(name) if source_key is None else f"{source_key}.{name}"] = _describe(value)
  if source_key is not None:
    for name, value in tree.items():
      if name != source_key:
        skipped[str(name)] = _describe(value)
        if (kept := _metadata_value(name, value)) is not None:
          metadata[str(name)] = kept

  stripped = None
  if tensors and all(name.startswith(DDP_PREFIX) for name in tensors):
    tensors = {name[len(DDP_PREFIX) :]: value for name, value in tensors.items()}
    stripped = DDP_PREFIX
  return PthCheckpoint(path, tensors, source_key, skipped, metadata, stripped)


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
  lines.append("  skipped:" if ckpt.skipped else "  skipped: nothing")
  lines.extend(f"    {name}: {description}" for name, description in ckpt.skipped.items())
  return "\n".join(lines)
