"""A torch-free writer of ``torch.save``-format ``.pth`` files.

It pickles (protocol 2, like torch.save) stand-in objects that emit exactly the
opcodes torch emits: GLOBAL 'torch._utils _rebuild_tensor_v2', persistent ids
('storage', GLOBAL 'torch FloatStorage', key, 'cpu', numel), ... and writes the
zip layout torch writes: ``<archive>/data.pkl``, ``byteorder``, one
64-byte-aligned uncompressed record per storage ``<archive>/data/<key>`` and
``version``.

Two entry points:
  * :func:`write_state_dict` -- the common case: ``{'model': {name: array}}``
    (or another wrapping) from a dict of numpy arrays; arrays may be given as
    zero-argument callables so multi-GB files are written one tensor at a time
    (see ``launch/measure_convert_memory.py``). `python -m mimdistill.convert
    SRC out.pth` writes official checkpoints with it: `torch.load(...,
    weights_only=True)` and the official code's `load_state_dict(...,
    strict=True)` read them.
  * :func:`write_pth` / :func:`write_raw_pth` -- full control (shared and
    strided storages, parameters, other globals) for the reader's tests.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
  "G",
  "FakeStorage",
  "FakeTensor",
  "FakeParameter",
  "tensor",
  "write_pth",
  "write_raw_pth",
  "write_state_dict",
]

_STORAGE_TYPES = {
  "float32": "FloatStorage",
  "float64": "DoubleStorage",
  "float16": "HalfStorage",
  "bfloat16": "BFloat16Storage",
  "int64": "LongStorage",
  "int32": "IntStorage",
  "int16": "ShortStorage",
  "int8": "CharStorage",
  "uint8": "ByteStorage",
  "bool": "BoolStorage",
}


class G:
  """A global to emit verbatim as GLOBAL '<module> <name>' (module need not exist)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce insists the callable is callable
    raise AssertionError("stand-in global is never called")


class FakeStorage:
  """Stands for a torch storage: written as data/<key>, referenced by persistent id.

  ``data`` is an array, or a zero-argument callable returning one (then
  ``dtype`` and ``numel`` must be given); a callable is only called when the
  record is written, so large files never hold more than one tensor.
  """

  def __init__(
    self, key: str, data, storage_type: str | None = None, numel: int | None = None, dtype=None
  ):
    self.key = key
    if callable(data):
      if numel is None or dtype is None:
        raise ValueError("a lazy storage needs numel= and dtype=")
      self.data, self.dtype = data, np.dtype(dtype)
    else:
      self.data = np.ascontiguousarray(data).reshape(-1)
      self.dtype = self.data.dtype
    self.storage_type = storage_type or _STORAGE_TYPES[str(self.dtype)]
    self.numel = self.data.size if numel is None else numel

  def materialize(self) -> np.ndarray:
    if callable(self.data):
      value = np.ascontiguousarray(self.data(), dtype=self.dtype).reshape(-1)
      if value.size != self.numel:
        raise ValueError(f"lazy storage returned {value.size} values, expected {self.numel}")
      return value
    return self.data


class FakeTensor:
  """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

  def __init__(
    self,
    storage: FakeStorage,
    offset: int = 0,
    size=None,
    stride=None,
    rebuild: str = "_rebuild_tensor_v2",
  ):
    self.storage, self.offset, self.rebuild = storage, offset, rebuild
    self.size = tuple(size) if size is not None else (storage.numel,)
    if stride is None:  # C-contiguous strides
      stride, step = [], 1
      for d in reversed(self.size):
        stride.insert(0, step)
        step *= d
    self.stride = tuple(stride)

  def __reduce__(self):
    args = (self.storage, self.offset, self.size, self.stride)
    if self.rebuild == "_rebuild_tensor_v2":
      args += (False, collections.OrderedDict())
    return G("torch._utils", self.rebuild), args


class FakeParameter:
  def __init__(self, tensor: FakeTensor):
    self.tensor = tensor

  def __reduce__(self):
    return G("torch._utils", "_rebuild_parameter"), (self.tensor, True, collections.OrderedDict())


def tensor(data, **kwargs) -> FakeTensor:
  """A contiguous tensor with its own storage (key assigned by write_pth).

  ``data``: an array (its shape is kept unless ``size=`` says otherwise), or
  a ``(callable, shape, dtype)`` triple for a lazily produced tensor.
  """
  if isinstance(data, tuple) and len(data) == 3 and callable(data[0]):
    fn, shape, dtype = data
    numel = int(np.prod(shape, dtype=np.int64))
    kwargs.setdefault("size", tuple(shape))
    return FakeTensor(FakeStorage("", fn, numel=numel, dtype=dtype), **kwargs)
  data = np.asarray(data)
  kwargs.setdefault("size", data.shape)
  return FakeTensor(FakeStorage("", data), **kwargs)


class _TorchLikePickler(pickle._Pickler):  # the pure-Python pickler lets us emit raw opcodes
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: dict[str, FakeStorage] = {}

  def persistent_id(self, obj):
    if not isinstance(obj, FakeStorage):
      return None
    if not obj.key:  # storages built by tensor(): number them in pickling order
      obj.key = str(len(self.storages))
    self.storages[obj.key] = obj
    return ("storage", G("torch", obj.storage_type), obj.key, "cpu", obj.numel)

  def save_fake_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[G] = save_fake_global


def _storage_bytes(data: np.ndarray, byteorder: str) -> bytes:
  if byteorder == "big" and data.dtype.itemsize > 1:
    data = data.byteswap()  # works for ml_dtypes.bfloat16 too
  return data.tobytes()


def _aligned_info(
  zf: zipfile.ZipFile, name: str, align: int | None, compress: bool
) -> zipfile.ZipInfo:
  info = zipfile.ZipInfo(name)
  info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  if align:
    header_end = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
    pad = -header_end % align
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
  return info


def write_raw_pth(
  path,
  pickle_bytes: bytes,
  storages: Mapping[str, Any] | None = None,
  *,
  archive: str = "archive",
  byteorder: str | None = "little",
  align: int | None = 64,
  compress: bool = False,
) -> pathlib.Path:
  """Write a torch.save-style zip: <archive>/data.pkl, byteorder, data/<key>, version.

  ``storages``: key -> bytes, or a zero-argument callable returning bytes
  (called when that record is written). With ``align``, storage entries get
  a padding extra field so their data starts at a multiple of ``align``
  bytes, as torch does; ``compress`` deflates storage entries.
  """
  path = pathlib.Path(path)
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    zf.writestr(f"{archive}/data.pkl", pickle_bytes)
    if byteorder is not None:
      zf.writestr(f"{archive}/byteorder", byteorder)
    for key, blob in (storages or {}).items():
      if callable(blob):
        blob = blob()
      zf.writestr(_aligned_info(zf, f"{archive}/data/{key}", align, compress), blob)
      del blob
    zf.writestr(f"{archive}/version", "3\n")
  return path


def write_pth(
  path,
  obj,
  *,
  byteorder: str = "little",
  omit: tuple[str, ...] = (),
  truncate: dict[str, int] | None = None,
  pickler_class=None,
  **kwargs,
) -> pathlib.Path:
  """Pickle ``obj`` like torch.save and write it with its storages.

  omit: storage keys to leave out of the zip; truncate: key -> bytes to keep.
  Lazy storages are produced one at a time while the zip is written.
  """
  buf = io.BytesIO()
  pickler = (pickler_class or _TorchLikePickler)(buf)
  pickler.dump(obj)

  def blob_of(storage: FakeStorage) -> Callable[[], bytes]:
    def make() -> bytes:
      blob = _storage_bytes(storage.materialize(), byteorder)
      keep = (truncate or {}).get(storage.key)
      return blob if keep is None else blob[:keep]

    return make

  blobs = {key: blob_of(storage) for key, storage in pickler.storages.items() if key not in omit}
  return write_raw_pth(path, buf.getvalue(), blobs, byteorder=byteorder, **kwargs)


def write_state_dict(
  path,
  state: Mapping[str, Any],
  *,
  wrap: str | None = "model",
  extra: Mapping[str, Any] | None = None,
  parameters: bool = False,
  **kwargs,
) -> pathlib.Path:
  """``torch.save({wrap: state_dict, **extra}, path)`` for a dict of arrays.

  ``state`` values: numpy arrays (their shape is kept, 0-d included) or
  ``(callable, shape, dtype)`` triples for lazily produced tensors.
  ``wrap=None`` saves the state dict itself at the top level (timm style).
  ``parameters=True`` wraps every tensor in ``nn.Parameter`` as a model's
  ``state_dict(keep_vars=True)`` would.
  """
  sd = collections.OrderedDict()
  for name, value in state.items():
    t = tensor(value)
    sd[name] = FakeParameter(t) if parameters else t
  obj: Any = sd if wrap is None else {wrap: sd}
  if extra:
    if wrap is None:
      raise ValueError("extra= needs a wrapping key (wrap=...)")
    obj.update(extra)
  return write_pth(path, obj, **kwargs)
