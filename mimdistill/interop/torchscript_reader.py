"""Safe reader for TorchScript archives (``torch.jit.save``), without torch.

OpenAI's released CLIP weights (``ViT-B-16.pt`` & co.) are TorchScript
archives, not ``torch.save`` checkpoints. The zip holds ``<name>/data.pkl``
(the module object tree), ``<name>/constants.pkl``, ``<name>/code/`` (the
TorchScript source of every module class) and the tensor storages under
``<name>/data/``. ``torch.jit.load`` compiles and runs that code; this
reader never looks at it. It unpickles ``data.pkl`` with the restricted
unpickler of :mod:`mimdistill.interop.pth_reader` (same storage and tensor
rebuild core, same refusal of every other global), whose allow-list is
widened by exactly two things:

* ``__torch__.*`` classes (the archive's module classes, e.g.
  ``__torch__.torch.nn.modules.linear.Linear``): each becomes an inert
  :class:`ScriptObject`, a ``pth_reader.StandIn`` record. Pickle can only create
  one (``NEWOBJ`` with no arguments) and hand it its attribute dict once
  (``BUILD``); it runs no code and keeps its type name as a string.
* the list helpers of ``torch.jit._pickle`` (``build_intlist`` & co. and
  ``restore_type_tag``), reimplemented as validating identity functions.

The tensors are then named by their attribute paths (``visual.conv1.weight``,
``transformer.resblocks.0.attn.in_proj_weight``), which is what
``model.state_dict()`` of the loaded module returns for parameters and
buffers (plain tensor attributes of a scripted module would be listed too).

Public API: :func:`read_torchscript`, :func:`is_torchscript_archive`,
:func:`read_torch_file` (either format), :class:`ScriptObject`.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import numpy as np

from mimdistill.interop import pth_reader
from mimdistill.interop.pth_reader import (
  CorruptCheckpointError,
  NoTensorsFoundError,
  PthCheckpoint,
  UnsafeCheckpointError,
)

__all__ = ["ScriptObject", "is_torchscript_archive", "read_torch_file", "read_torchscript"]

_MODULE = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ScriptObject(pth_reader.StandIn):
  """One TorchScript object of an archive: its type name and its state.

  An inert :class:`~mimdistill.interop.pth_reader.StandIn` record: created without
  arguments (``NEWOBJ``), given its state once (``BUILD``): the dict of its attributes
  (parameters, buffers, submodules, flags) for ordinary modules.
  """

  __slots__ = ()

  @property
  def type_name(self) -> str:
    return self.qualname

  @property
  def state(self) -> Any:
    return self._state

  def __repr__(self):
    return f"<TorchScript object {self.qualname}>"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
  """The inert record class standing for the archive's class `qualname`."""
  cls = _SCRIPT_CLASSES.get(qualname)
  if cls is None:
    cls = _SCRIPT_CLASSES[qualname] = pth_reader.stand_in(qualname, base=ScriptObject)
  return cls


def _as_list(what: str):
  def build(items):
    if not isinstance(items, list):
      raise CorruptCheckpointError(
        f"torch.jit._pickle.{what} expects a list, got {type(items).__name__}"
      )
    return list(items)

  return build


def _restore_type_tag(value, type_tag):
  if not isinstance(type_tag, str):
    raise CorruptCheckpointError("torch.jit._pickle.restore_type_tag expects a type string")
  return value


_JIT_HELPERS = {
  ("torch.jit._pickle", name): pth_reader.stand_in(f"torch.jit._pickle.{name}", _as_list(name))
  for name in (
    "build_intlist",
    "build_floatlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
  )
}
_JIT_HELPERS[("torch.jit._pickle", "restore_type_tag")] = pth_reader.stand_in(
  "torch.jit._pickle.restore_type_tag", _restore_type_tag
)


class _TorchScriptUnpickler(pth_reader._RestrictedUnpickler):
  """The .pth reader's unpickler plus inert `__torch__.*` records and the
  `torch.jit._pickle` list helpers; every other global is refused as there."""

  def find_class(self, module, name):
    if module == "__torch__" or module.startswith("__torch__."):
      if not (_MODULE.fullmatch(module) and _NAME.fullmatch(name)):
        raise UnsafeCheckpointError(
          f"refusing to load {self._archive.path!r}: its data.pkl names the class "
          f"{module[:100]!r}.{name[:100]!r}, which is not a TorchScript class name; "
          "nothing in the file was run"
        )
      return _script_class(f"{module}.{name}")
    helper = _JIT_HELPERS.get((module, name))
    if helper is not None:
      return helper
    return super().find_class(module, name)


def _entries(path) -> list[str]:
  try:
    with zipfile.ZipFile(path) as z:
      return z.namelist()
  except (zipfile.BadZipFile, OSError, ValueError):
    return []


def is_torchscript_archive(path) -> bool:
  """True for a zip with TorchScript's `<name>/code/` or `<name>/constants.pkl`
  records next to `<name>/data.pkl` (a `torch.save` archive has neither)."""
  names = _entries(path)
  tops = {n.split("/", 1)[0] for n in names if n.endswith("/data.pkl") and n.count("/") == 1}
  return any(
    n.split("/", 1)[0] in tops and (n.split("/")[1] in ("code", "constants.pkl"))
    for n in names
    if n.count("/") >= 1
  )


def _collect(obj: ScriptObject, prefix: str, tensors: dict, skipped: dict, seen: set):
  if id(obj) in seen:
    return
  seen.add(id(obj))
  state = obj.state
  where = prefix[:-1] or "<root>"
  if not isinstance(state, dict):
    if state is not None:
      skipped[where] = f"{obj.qualname} pickled a {type(state).__name__} state, not attributes"
    return
  for key, value in state.items():
    # (Unreadable tensors were already refused by name, by pth_reader._read_tree.)
    name = f"{prefix}{key}"
    if isinstance(value, np.ndarray):
      tensors[name] = value
    elif isinstance(value, ScriptObject):
      _collect(value, f"{name}.", tensors, skipped, seen)


def read_torchscript(path, *, mmap: bool = True) -> PthCheckpoint:
  """The tensors of a TorchScript archive by attribute path, nothing run.

  Returns a :class:`PthCheckpoint` (`source_key` None, `metadata` with
  `format: 'torchscript'` and the root module's `root_type`).

  Raises:
    UnsafeCheckpointError: data.pkl names a global outside the allow-list
      (nothing was executed); NoTensorsFoundError: the root is not a module
      or holds no tensors; other CheckpointReadError subclasses as load_pth.
  """
  path = os.fspath(path)
  if not is_torchscript_archive(path):
    raise NoTensorsFoundError(
      f"{path!r} is not a TorchScript archive (no '<name>/code/' or "
      "'<name>/constants.pkl' next to '<name>/data.pkl'); read a torch.save file with "
      "pth_reader.load_pth"
    )
  tree = pth_reader._read_tree(path, mmap, unpickler=_TorchScriptUnpickler)
  if not isinstance(tree, ScriptObject):
    raise NoTensorsFoundError(
      f"{path!r}: the TorchScript archive's data.pkl holds a {pth_reader._describe(tree)}, "
      "not a module object"
    )
  tensors: dict[str, np.ndarray] = {}
  skipped: dict[str, str] = {}
  _collect(tree, "", tensors, skipped, set())
  if not tensors:
    raise NoTensorsFoundError(f"{path!r}: TorchScript module {tree.qualname} holds no tensors")
  return PthCheckpoint(
    path=path,
    tensors=tensors,
    source_key=None,
    skipped=skipped,
    metadata={"format": "torchscript", "root_type": tree.qualname},
  )


def read_torch_file(path, *, mmap: bool = True, key: str | None = None) -> PthCheckpoint:
  """A state dict from either a TorchScript archive or a `torch.save` file
  (`key` as in `load_pth`; TorchScript archives have no keys)."""
  if is_torchscript_archive(path):
    return read_torchscript(path, mmap=mmap)
  return pth_reader.load_pth(path, mmap=mmap, key=key)
