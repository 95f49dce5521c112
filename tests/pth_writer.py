"""The torch-free `.pth` writer (`mimdistill.interop.pth_writer`) plus what only
the reader's tests write: hostile globals and argparse namespaces."""

import pickle

from mimdistill.interop import pth_writer as _writer
from mimdistill.interop.pth_writer import (  # noqa: F401  (re-exported for the tests)
  FakeParameter,
  FakeStorage,
  FakeTensor,
  G,
  _TorchLikePickler,
  tensor,
  write_raw_pth,
)


class FakeNamespace:
  """Pickles like argparse.Namespace: GLOBAL, EMPTY_TUPLE, NEWOBJ, then BUILD with a dict."""

  def __init__(self, **fields):
    self.fields = fields


class Evil:
  """A REDUCE of an arbitrary global, e.g. builtins.eval(code)."""

  def __init__(self, module: str, name: str, *args):
    self.target, self.args = G(module, name), args

  def __reduce__(self):
    return self.target, self.args


class _TestPickler(_TorchLikePickler):
  dispatch = _TorchLikePickler.dispatch.copy()

  def save_fake_namespace(self, obj):
    self.save(G("argparse", "Namespace"))
    self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
    self.memoize(obj)
    self.save(obj.fields)
    self.write(pickle.BUILD)

  dispatch[FakeNamespace] = save_fake_namespace


def write_pth(path, obj, **kwargs):
  return _writer.write_pth(path, obj, pickler_class=_TestPickler, **kwargs)


def write_state_dict(path, state, **kwargs):
  return _writer.write_state_dict(path, state, pickler_class=_TestPickler, **kwargs)
