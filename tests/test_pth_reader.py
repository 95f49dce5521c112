"""Tests for mimdistill.interop.pth_reader: reading torch.save files without torch.

Two kinds of input:
* the reference fixtures written by real torch under <repo>/../shared/fixtures
  (skipped with a reason when that folder is absent);
* small .pth files built here WITHOUT torch by `write_pth`, a minimal writer of
  the torch.save zip layout. It pickles (protocol 2, like torch.save) stand-in
  objects that emit exactly the opcodes torch emits: GLOBAL
  'torch._utils _rebuild_tensor_v2', persistent ids
  ('storage', GLOBAL 'torch FloatStorage', key, 'cpu', numel), and so on.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import ml_dtypes
import numpy as np
import pytest

from mimdistill.interop import pth_reader
from mimdistill.interop.pth_reader import (
  PREFERRED_KEYS,
  CheckpointNotFoundError,
  CheckpointReadError,
  CorruptCheckpointError,
  LegacyFormatError,
  NoTensorsFoundError,
  PickledNamespace,
  UnsafeCheckpointError,
  load_pth,
  read_pickle_tree,
  summarize,
)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
# The ViT kinds' fixtures are copied into the repository; ../shared (a
# developer checkout) adds the other families' checkpoints.
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
UNTRUSTED = FIXTURES / "untrusted" / "untrusted.pth"
MARKER = "untrusted_pickle_ran.txt"


def _fixture(*parts: str) -> pathlib.Path:
  path = FIXTURES.joinpath(*parts)
  if not path.exists():
    pytest.skip(
      f"reference fixture {path} is absent (expected the shared/ folder next to the "
      "repository root)"
    )
  return path


def _fixture_pths() -> list[pathlib.Path]:
  roots = [FIXTURES] + ([SHARED / "fixtures"] if (SHARED / "fixtures").is_dir() else [])
  return sorted(p for root in roots for p in root.rglob("*.pth") if p.parent.name != "untrusted")


# ---------------------------------------------------------------------------
# A torch-free writer of torch.save-style zip checkpoints
# ---------------------------------------------------------------------------


# The torch-free writer of official-format .pth files is shared with the
# convert tests.
from pth_writer import (  # noqa: E402
  Evil,
  FakeNamespace,
  FakeParameter,
  FakeStorage,
  FakeTensor,
  _TorchLikePickler,
  tensor,
  write_pth,
  write_raw_pth,
)


@pytest.mark.parametrize(
  "path", _fixture_pths(), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.name}"
)
def test_every_fixture_loads_identically_with_and_without_mmap(path):
  mapped = load_pth(path)
  read = load_pth(path, mmap=False)
  assert mapped.source_key in (None, *PREFERRED_KEYS) and mapped.source_key == read.source_key
  assert mapped.tensors and list(mapped.tensors) == list(read.tensors)
  for name, value in mapped.tensors.items():
    assert isinstance(value, np.ndarray) and value.dtype.kind in "fiub", name
    assert value.flags.c_contiguous, name
    assert value.tobytes() == read.tensors[name].tobytes(), name
  # mmap views are read-only views of the file; the read path gives owned memory.
  assert not any(v.flags.writeable for v in mapped.tensors.values() if v.size)
  assert all(v.flags.writeable for v in read.tensors.values())


def test_mae_full_shapes_and_names():
  ckpt = load_pth(_fixture("mae", "mae_full.pth"))
  assert ckpt.tensors["cls_token"].shape == (1, 1, 64)
  assert ckpt.tensors["patch_embed.proj.weight"].shape == (64, 3, 4, 4)
  assert ckpt.tensors["pos_embed"].shape == (1, 65, 64)
  assert ckpt.tensors["decoder_pos_embed"].shape == (1, 65, 32)
  assert ckpt.tensors["blocks.0.attn.qkv.weight"].shape == (192, 64)
  assert ckpt.skipped == {} and ckpt.metadata == {} and ckpt.stripped_prefix is None
  assert ckpt.path.endswith("mae_full.pth")


def test_training_style_matches_full_bit_for_bit():
  full = load_pth(_fixture("mae", "mae_full.pth"))
  training = load_pth(_fixture("mae", "mae_training_style.pth"))
  assert list(full.tensors) == list(training.tensors)
  for name, value in full.tensors.items():
    other = training.tensors[name]
    assert value.dtype == other.dtype and value.shape == other.shape, name
    assert value.tobytes() == other.tobytes(), name


def test_training_style_reports_skipped_keys_and_metadata():
  ckpt = load_pth(_fixture("mae", "mae_training_style.pth"))
  assert ckpt.source_key == "model"
  assert set(ckpt.skipped) == {"optimizer", "epoch", "scaler", "args"}
  assert ckpt.skipped["optimizer"] == "dict with 2 entries (state, param_groups)"
  assert ckpt.skipped["epoch"] == "int 3"
  assert ckpt.skipped["scaler"].startswith("dict with 1 entry")
  assert ckpt.skipped["args"].startswith("argparse.Namespace (")
  assert ckpt.metadata["epoch"] == 3
  assert ckpt.metadata["args"]["epochs"] == 10
  assert ckpt.metadata["args"]["blr"] == pytest.approx(1.5e-4)
  text = summarize(ckpt)
  assert "cls_token" in text and "(1, 1, 64)" in text
  assert "optimizer: dict with 2 entries" in text and "epoch: int 3" in text


def test_training_style_full_tree():
  tree = read_pickle_tree(_fixture("mae", "mae_training_style.pth"))
  assert set(tree) == {"model", "optimizer", "epoch", "scaler", "args"}
  assert isinstance(tree["args"], PickledNamespace) and tree["args"].epochs == 10
  assert tree["optimizer"]["param_groups"][0]["params"] == [0, 1]
  assert tree["scaler"] == {"scale": 65536.0}


def test_untrusted_fixture_is_refused_and_nothing_runs(tmp_path, monkeypatch):
  path = _fixture("untrusted", "untrusted.pth")
  monkeypatch.chdir(tmp_path)  # the payload would write the marker into the cwd
  for reader in (load_pth, read_pickle_tree):
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os)\.system'") as info:
      reader(path)
    message = str(info.value)
    assert str(path) in message
    assert "NOT executed" in message and "Only tensors" in message
    assert isinstance(info.value, CheckpointReadError) and isinstance(info.value, ValueError)
  assert not (tmp_path / MARKER).exists()
  assert list(tmp_path.iterdir()) == []


def test_truncated_fixture(tmp_path):
  source = _fixture("mae", "mae_full.pth")
  data = source.read_bytes()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(CorruptCheckpointError, match="truncated") as info:
    load_pth(cut)
  assert str(cut) in str(info.value) and "re-download" in str(info.value).lower()


def test_corrupted_data_pkl_fails_crc(tmp_path):
  source = _fixture("mae", "mae_full.pth")
  bad = tmp_path / "bad.pth"
  shutil.copyfile(source, bad)
  with zipfile.ZipFile(bad) as zf:
    info = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
  raw = bytearray(bad.read_bytes())
  name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
  start = info.header_offset + 30 + name_len + extra_len
  middle = start + info.file_size // 2
  raw[middle : middle + 16] = b"\xff" * 16
  bad.write_bytes(bytes(raw))
  with pytest.raises(CorruptCheckpointError, match=r"data\.pkl.*corrupt"):
    load_pth(bad)


def _data_offset(path: pathlib.Path, name: str) -> tuple[int, int]:
  """Where the stored bytes of zip entry `name` start in the file, and how many there are."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(name)
  with open(path, "rb") as f:
    f.seek(info.header_offset + 26)
    name_len, extra_len = struct.unpack("<HH", f.read(4))
  return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _flip_byte(path: pathlib.Path, name: str) -> pathlib.Path:
  """Change one byte in the middle of entry `name`, as a disk or transfer error would."""
  start, size = _data_offset(path, name)
  raw = bytearray(path.read_bytes())
  raw[start + size // 2] ^= 0x01
  bad = path.with_name(f"bad_{path.name}")
  bad.write_bytes(bytes(raw))
  return bad


def _small_pth(tmp_path) -> pathlib.Path:
  model = {
    "a": tensor(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "b": tensor(np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8)),
  }
  return write_pth(tmp_path / "small.pth", {"model": model, "epoch": 2})


@pytest.mark.parametrize("mmap", [True, False])
def test_intact_file_passes_crc_and_a_changed_storage_byte_is_refused(tmp_path, mmap):
  path = _small_pth(tmp_path)
  ckpt = load_pth(path, mmap=mmap)
  np.testing.assert_array_equal(
    ckpt.tensors["b"], np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8)
  )
  bad = _flip_byte(path, "archive/data/1")
  with pytest.raises(CorruptCheckpointError) as info:
    load_pth(bad, mmap=mmap)
  message = str(info.value)
  assert str(bad) in message and "'model.b'" in message and "'archive/data/1'" in message
  assert "CRC-32" in message and "re-download" in message.lower() and "\n" not in message
  with pytest.raises(CorruptCheckpointError, match=r"'archive/data/1'.*CRC-32"):
    read_pickle_tree(bad, mmap=mmap)


@pytest.mark.parametrize("mmap", [True, False])
def test_changed_data_pkl_byte_is_refused(tmp_path, mmap):
  bad = _flip_byte(_small_pth(tmp_path), "archive/data.pkl")
  with pytest.raises(CorruptCheckpointError) as info:
    load_pth(bad, mmap=mmap)
  message = str(info.value)
  assert "'archive/data.pkl'" in message and "CRC-32" in message
  assert "re-download" in message.lower()


def test_mapped_storages_are_checked_once_as_they_are_read(tmp_path, monkeypatch):
  # One storage shared by three tensors plus one of its own: each record's bytes go through
  # the CRC once, when its storage is first rebuilt, and nothing else is summed.
  shared = FakeStorage("", np.arange(10, dtype=np.int64))
  model = {
    "head": FakeTensor(shared, 0, (2,)),
    "body": FakeTensor(shared, 2, (2, 3)),
    "tail": FakeTensor(shared, 8, (2,)),
    "own": tensor(np.ones((3, 3), np.float32)),
  }
  path = write_pth(tmp_path / "shared.pth", {"model": model})
  summed = []

  def crc32(data, value=0):
    summed.append(len(data))
    return real_crc32(data, value)

  real_crc32 = zlib.crc32  # zipfile keeps its own reference: only the reader's sums count
  monkeypatch.setattr(zlib, "crc32", crc32)
  ckpt = load_pth(path)
  assert not ckpt.tensors["body"].flags.writeable  # views of the mapped file
  assert sorted(summed) == [3 * 3 * 4, 10 * 8]


def test_random_bytes_are_not_a_checkpoint(tmp_path):
  junk = tmp_path / "junk.pth"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(CorruptCheckpointError, match="not a zip archive"):
    load_pth(junk)


def test_missing_file(tmp_path):
  missing = tmp_path / "nope.pth"
  with pytest.raises(CheckpointNotFoundError, match="nope.pth") as info:
    load_pth(missing)
  assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointReadError)


def test_empty_file_and_directory(tmp_path):
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(CorruptCheckpointError, match="empty"):
    load_pth(empty)
  with pytest.raises(CheckpointReadError, match="directory"):
    load_pth(tmp_path)


def test_legacy_format_is_detected(tmp_path):
  legacy = tmp_path / "legacy.pth"
  # What torch < 1.6 wrote first: pickle.dumps(MAGIC_NUMBER, protocol=2), then more pickles.
  legacy.write_bytes(
    pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
  )
  with pytest.raises(LegacyFormatError, match="legacy") as info:
    load_pth(legacy)
  assert "torch.save(torch.load(" in str(info.value)


def test_bare_pickle_is_not_executed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  bare = tmp_path / "bare.pth"
  bare.write_bytes(pickle.dumps({"w": 1}, protocol=2))
  with pytest.raises(CorruptCheckpointError, match="bare pickle"):
    load_pth(bare)


# ---------------------------------------------------------------------------
# Files built without torch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
def test_transposed_tensor(tmp_path, mmap):
  storage = FakeStorage("", np.arange(6, dtype=np.float32))
  path = write_pth(tmp_path / "t.pth", {"model": {"w_t": FakeTensor(storage, 0, (3, 2), (1, 3))}})
  w = load_pth(path, mmap=mmap).tensors["w_t"]
  np.testing.assert_array_equal(w, np.arange(6, dtype=np.float32).reshape(2, 3).T)
  assert w.flags.c_contiguous  # non-contiguous views are copied


@pytest.mark.parametrize("mmap", [True, False])
def test_shared_storage_with_offsets(tmp_path, mmap):
  storage = FakeStorage("", np.arange(10, dtype=np.int64))
  model = {
    "head": FakeTensor(storage, 0, (2,)),
    "body": FakeTensor(storage, 2, (2, 3)),
    "strided": FakeTensor(storage, 1, (3,), (3,)),
  }
  path = write_pth(tmp_path / "s.pth", {"model": model})
  t = load_pth(path, mmap=mmap).tensors
  np.testing.assert_array_equal(t["head"], [0, 1])
  np.testing.assert_array_equal(t["body"], np.arange(2, 8).reshape(2, 3))
  np.testing.assert_array_equal(t["strided"], [1, 4, 7])
  with zipfile.ZipFile(path) as zf:  # one storage record serves all three tensors
    assert [n for n in zf.namelist() if "/data/" in n] == ["archive/data/0"]


DTYPE_CASES = {
  "float16": np.array([[1.5, -2.25, 65504.0]], dtype=np.float16),
  "bfloat16": np.array([1.0, -3.5, 1e30, 0.0078125], dtype=ml_dtypes.bfloat16),
  "int64": np.array([-(2**62), 0, 7, 2**40], dtype=np.int64),
  "bool": np.array([True, False, False, True, True]),
  "float64": np.array([np.pi, -1e-300]),
  "int32": np.array([-5, 2**31 - 1], dtype=np.int32),
  "int8": np.array([-128, 127], dtype=np.int8),
  "uint8": np.array([0, 255], dtype=np.uint8),
}


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPE_CASES))
def test_dtypes_round_trip(tmp_path, dtype_name, byteorder):
  value = DTYPE_CASES[dtype_name]
  path = write_pth(
    tmp_path / "d.pth", {"model": {"x": tensor(value, size=value.shape)}}, byteorder=byteorder
  )
  for mmap in (True, False):
    got = load_pth(path, mmap=mmap).tensors["x"]
    assert got.dtype == value.dtype and got.shape == value.shape
    assert got.dtype.isnative  # big-endian files come back in native order
    assert got.tobytes() == value.tobytes()


def test_compressed_and_unaligned_entries_fall_back(tmp_path):
  value = np.arange(12, dtype=np.float32).reshape(3, 4)
  obj = {"model": {"x": tensor(value, size=(3, 4))}}
  for name, kwargs in {"deflated": {"compress": True}, "unaligned": {"align": None}}.items():
    path = write_pth(tmp_path / f"{name}.pth", obj, **kwargs)
    for mmap in (True, False):
      np.testing.assert_array_equal(load_pth(path, mmap=mmap).tensors["x"], value)


def test_module_prefix_is_stripped(tmp_path):
  state = collections.OrderedDict(
    [
      ("module.blocks.0.w", tensor(np.ones(2, np.float32))),
      ("module.norm.b", tensor(np.zeros(3, np.float32))),
    ]
  )
  ckpt = load_pth(write_pth(tmp_path / "ddp.pth", {"model": state}))
  assert list(ckpt.tensors) == ["blocks.0.w", "norm.b"]
  assert ckpt.stripped_prefix == "module."
  assert "stripped prefix 'module.'" in summarize(ckpt)


def test_prefix_kept_unless_every_name_has_it(tmp_path):
  state = {"module.a": tensor(np.ones(1, np.float32)), "b": tensor(np.ones(1, np.float32))}
  ckpt = load_pth(write_pth(tmp_path / "mixed.pth", {"model": state}))
  assert set(ckpt.tensors) == {"module.a", "b"} and ckpt.stripped_prefix is None


def test_parameter_legacy_rebuild_and_dtype_storage_types(tmp_path):
  data = np.arange(4, dtype=np.float32)
  model = {
    "param": FakeParameter(tensor(data)),
    "legacy": tensor(data, rebuild="_rebuild_tensor"),
    # storage type given as a torch dtype (GLOBAL 'torch float32')
    "by_dtype": FakeTensor(FakeStorage("", data, storage_type="float32")),
    # an untyped storage: uint8 bytes, numel counted in bytes
    "untyped": FakeTensor(
      FakeStorage("", np.frombuffer(b"\x01\x02\x03", np.uint8), storage_type="UntypedStorage")
    ),
  }
  t = load_pth(write_pth(tmp_path / "p.pth", {"model": model})).tensors
  for name in ("param", "legacy", "by_dtype"):
    np.testing.assert_array_equal(t[name], data)
  np.testing.assert_array_equal(t["untyped"], [1, 2, 3])
  assert t["untyped"].dtype == np.uint8


def test_numpy_scalars_namespace_and_builtins_are_allowed(tmp_path):
  obj = {
    "model": {"w": tensor(np.ones(2, np.float32))},
    "epoch": np.int64(5),
    "best_acc": np.float64(0.25),
    "args": FakeNamespace(lr=0.1, tags={"a", "b"}, blob=b"\x00\xff", empty=b"", z=1 + 2j),
    "history": [1, 2.5, "x", None, (True,)],
  }
  ckpt = load_pth(write_pth(tmp_path / "n.pth", obj))
  assert ckpt.metadata["epoch"] == 5 and ckpt.metadata["best_acc"] == 0.25
  assert ckpt.skipped["epoch"] == "numpy.int64 5"
  assert ckpt.metadata["args"] == {
    "lr": 0.1,
    "tags": {"a", "b"},
    "blob": b"\x00\xff",
    "empty": b"",
    "z": 1 + 2j,
  }
  assert ckpt.skipped["history"] == "list of 5 items"
  plain_args = write_pth(
    tmp_path / "a.pth", {"model": {"w": tensor(np.ones(1, np.float32))}, "args": {"lr": 0.5}}
  )
  assert load_pth(plain_args).metadata == {"args": {"lr": 0.5}}
  tree = read_pickle_tree(tmp_path / "n.pth")
  assert type(tree["epoch"]) is np.int64 and isinstance(tree["args"], PickledNamespace)


@pytest.mark.parametrize(
  "module,name",
  [
    ("builtins", "eval"),
    ("__builtin__", "exec"),
    ("os", "system"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("torch", "load"),
    ("argparse", "ArgumentParser"),
  ],
)
def test_other_globals_are_refused_before_running(tmp_path, monkeypatch, module, name):
  monkeypatch.chdir(tmp_path)
  code = "open('evil_ran.txt', 'w').write('x')"
  obj = {"model": {"w": tensor(np.ones(2, np.float32))}, "extra": Evil(module, name, code)}
  path = write_pth(tmp_path / "evil.pth", obj)
  with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'") as info:
    load_pth(path)
  assert str(path) in str(info.value) and "NOT executed" in str(info.value)
  assert not (tmp_path / "evil_ran.txt").exists()


def _raw_pickle_case(tmp_path, body: bytes) -> pathlib.Path:
  return write_raw_pth(tmp_path / "raw.pth", b"\x80\x02" + body + b".")


def test_stack_global_and_inst_opcodes_are_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  # protocol 4 STACK_GLOBAL builtins.exec, then REDUCE
  code = b"open('evil_ran.txt', 'w')"
  stack_global = b"\x8c\x08builtins\x8c\x04exec\x93\x8c" + bytes([len(code)]) + code + b"\x85R"
  with pytest.raises(UnsafeCheckpointError, match=r"'builtins\.exec'"):
    load_pth(_raw_pickle_case(tmp_path, stack_global))
  # protocol 0 INST: calls os.system(...) directly
  inst = b"(S'touch evil_ran.txt'\nios\nsystem\n"
  with pytest.raises(UnsafeCheckpointError, match=r"'os\.system'"):
    load_pth(_raw_pickle_case(tmp_path, inst))
  assert not (tmp_path / "evil_ran.txt").exists()


def test_build_cannot_tamper_with_allowed_globals(tmp_path):
  # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD (None, {'_fn': 1}): setattr on our stand-in.
  body = b"ctorch._utils\n_rebuild_tensor_v2\n(N}U\x03_fnK\x01stb"
  with pytest.raises(CorruptCheckpointError, match="could not be unpickled"):
    load_pth(_raw_pickle_case(tmp_path, body))
  # ... and on the Namespace stand-in class itself.
  body = b"cargparse\nNamespace\n(N}U\x0b__setstate__K\x01stb"
  with pytest.raises(CorruptCheckpointError):
    load_pth(_raw_pickle_case(tmp_path, body))
  # The allow-listed objects still work afterwards.
  path = write_pth(
    tmp_path / "ok.pth",
    {"model": {"w": tensor(np.arange(3, dtype=np.float32))}, "args": FakeNamespace(a=1)},
  )
  ckpt = load_pth(path)
  np.testing.assert_array_equal(ckpt.tensors["w"], [0, 1, 2])
  assert ckpt.metadata["args"] == {"a": 1}


# GLOBAL torch.FloatStorage as a persistent id ('storage', type, '0', 'cpu', 2).
_STORAGE_PID = (
  b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
)


@pytest.mark.parametrize(
  "body,match",
  [
    # BUILD on a storage record, as a dict and as slot state: it is immutable.
    (_STORAGE_PID + b"}X\x05\x00\x00\x00numelJ\x00\xca\x9a\x3bsb", "could not be unpickled"),
    (_STORAGE_PID + b"(N}X\x05\x00\x00\x00numelJ\x00\xca\x9a\x3bstb", "could not be unpickled"),
    # argparse.Namespace called with arguments, or given its state twice.
    (b"cargparse\nNamespace\n(X\x01\x00\x00\x00xtR", "could not be unpickled"),
    (b"cargparse\nNamespace\n)\x81}b}b", "could not be unpickled"),
    # a stand-in that is not a storage type used as one
    (_STORAGE_PID.replace(b"ctorch\nFloatStorage\n", b"cargparse\nNamespace\n"), "storage class"),
  ],
  ids=["build-storage", "build-storage-slots", "namespace-called", "namespace-twice", "fake-type"],
)
def test_stand_ins_and_storages_cannot_be_misused(tmp_path, body, match):
  path = write_raw_pth(tmp_path / "raw.pth", b"\x80\x02" + body + b".", {"0": b"\x00" * 8})
  with pytest.raises(CorruptCheckpointError, match=match):
    read_pickle_tree(path)


def test_namespace_record_is_read_only(tmp_path):
  path = write_pth(
    tmp_path / "ns.pth",
    {"model": {"w": tensor(np.ones(1, np.float32))}, "args": FakeNamespace(lr=0.5)},
  )
  args = read_pickle_tree(path)["args"]
  assert isinstance(args, PickledNamespace) and args.lr == 0.5 and dict(vars(args)) == {"lr": 0.5}
  with pytest.raises(TypeError):
    vars(args)["lr"] = 1.0
  with pytest.raises(AttributeError):
    args.lr = 1.0
  with pytest.raises(AttributeError, match="no field 'missing'"):
    args.missing  # noqa: B018


def test_object_numpy_dtype_is_refused(tmp_path):
  # numpy.core.multiarray.scalar(numpy.dtype('O8'), ...) would build an object scalar.
  body = (
    b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
    b"C\x08\x00\x00\x00\x00\x00\x00\x00\x00\x86R"
  )
  with pytest.raises(UnsafeCheckpointError, match="'O8' is not allowed"):
    read_pickle_tree(_raw_pickle_case(tmp_path, body))


def test_missing_storage_entry_names_tensor_and_entry(tmp_path):
  obj = {
    "model": {"ok": tensor(np.ones(2, np.float32)), "cls_token": tensor(np.ones(4, np.float32))}
  }
  path = write_pth(tmp_path / "m.pth", obj, omit=("1",))
  with pytest.raises(CorruptCheckpointError) as info:
    load_pth(path)
  message = str(info.value)
  assert "'model.cls_token'" in message and "'archive/data/1'" in message and "missing" in message


@pytest.mark.parametrize("mmap", [True, False])
def test_short_storage_entry_names_tensor_and_entry(tmp_path, mmap):
  obj = {"model": {"pos_embed": tensor(np.ones((1, 5, 4), np.float32), size=(1, 5, 4))}}
  path = write_pth(tmp_path / "short.pth", obj, truncate={"0": 40})
  with pytest.raises(CorruptCheckpointError) as info:
    load_pth(path, mmap=mmap)
  message = str(info.value)
  assert "'model.pos_embed'" in message and "'archive/data/0'" in message
  assert "40 bytes" in message and "needs 80" in message


def test_tensor_extent_beyond_storage(tmp_path):
  storage = FakeStorage("", np.ones(4, np.float32))
  path = write_pth(tmp_path / "x.pth", {"model": {"big": FakeTensor(storage, 2, (2, 2), (2, 1))}})
  with pytest.raises(CorruptCheckpointError, match=r"'model\.big'.*element 5.*only 4 elements"):
    load_pth(path)


def test_malformed_pickle_with_valid_crc(tmp_path):
  buf = io.BytesIO()
  _TorchLikePickler(buf).dump({"model": {"w": 1}})
  path = write_raw_pth(tmp_path / "p.pth", buf.getvalue()[:-6])  # cut before STOP
  with pytest.raises(CorruptCheckpointError, match="could not be unpickled"):
    load_pth(path)


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / "other.zip.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("weights/readme.txt", "hello")
  with pytest.raises(CorruptCheckpointError, match=r"data\.pkl.*not a torch\.save checkpoint"):
    load_pth(path)


def test_bad_byteorder_record(tmp_path):
  path = write_pth(
    tmp_path / "b.pth", {"model": {"w": tensor(np.ones(1, np.float32))}}, byteorder="middle"
  )
  with pytest.raises(CorruptCheckpointError, match="'middle'"):
    load_pth(path)


def test_no_tensors_lists_top_level_keys(tmp_path):
  path = write_pth(tmp_path / "none.pth", {"epoch": 3, "note": "hello"})
  with pytest.raises(NoTensorsFoundError, match=r"epoch: int 3.*note: str 'hello'"):
    load_pth(path)
  path = write_pth(tmp_path / "list.pth", [tensor(np.ones(1, np.float32))])
  with pytest.raises(NoTensorsFoundError, match="not a dict"):
    load_pth(path)
  np.testing.assert_array_equal(read_pickle_tree(path)[0], [1.0])


def test_key_selection(tmp_path):
  a, b = np.ones(2, np.float32), np.zeros(3, np.float32)
  both = write_pth(
    tmp_path / "both.pth", {"state_dict": {"s": tensor(b)}, "model": {"m": tensor(a)}}
  )
  assert load_pth(both).source_key == "model"
  ckpt = load_pth(both, key="state_dict")
  assert ckpt.source_key == "state_dict" and list(ckpt.tensors) == ["s"]
  assert ckpt.skipped == {"model": "dict with 1 entry (m)"}

  pair = write_pth(
    tmp_path / "pair.pth", {"teacher": {"t": tensor(a)}, "student": {"s": tensor(b)}}
  )
  with pytest.raises(NoTensorsFoundError, match=r"teacher: dict.*key="):
    load_pth(pair)
  assert list(load_pth(pair, key="teacher").tensors) == ["t"]
  with pytest.raises(NoTensorsFoundError, match="'ema' is not in the checkpoint"):
    load_pth(pair, key="ema")

  flat = write_pth(tmp_path / "flat.pth", collections.OrderedDict([("w", tensor(a)), ("step", 7)]))
  ckpt = load_pth(flat)
  assert ckpt.source_key is None and list(ckpt.tensors) == ["w"]
  assert ckpt.skipped == {"step": "int 7"}


def test_state_dict_metadata_attribute_is_tolerated(tmp_path):
  # torch's state_dict() is an OrderedDict with a `_metadata` attribute set by BUILD.
  state = collections.OrderedDict([("w", tensor(np.ones(2, np.float32)))])
  state._metadata = collections.OrderedDict([("", {"version": 1})])
  ckpt = load_pth(write_pth(tmp_path / "md.pth", {"model": state}))
  assert list(ckpt.tensors) == ["w"]


def test_summarize_lists_tensors_and_skipped(tmp_path):
  obj = {"model": {"a.weight": tensor(np.ones((2, 3), np.float16), size=(2, 3))}, "epoch": 1}
  text = summarize(load_pth(write_pth(tmp_path / "s.pth", obj)))
  assert "weights from 'model': 1 tensors, 6 values" in text
  assert "a.weight" in text and "float16" in text and "(2, 3)" in text
  assert "epoch: int 1" in text


def test_torch_never_imported(tmp_path):
  # In a fresh interpreter: other test modules of the suite may import torch
  # into this one, which would say nothing about the reader.
  built = write_pth(
    tmp_path / "built.pth",
    {
      "model": {"w": tensor(np.ones(2, np.float32))},
      "args": FakeNamespace(a=1),
      "epoch": np.int64(1),
    },
  )
  paths = [str(p) for p in _fixture_pths()] + [str(built)]
  script = textwrap.dedent("""
        import sys
        from mimdistill.interop.pth_reader import load_pth, read_pickle_tree
        for path in sys.argv[1:]:
            assert load_pth(path).tensors, path
            read_pickle_tree(path, mmap=False)
        assert "torch" not in sys.modules, "the reader imported torch"
        print("ok", len(sys.argv) - 1)
    """)
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
  }
  result = subprocess.run(
    [sys.executable, "-c", script, *paths],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["ok", str(len(paths))]
  assert "torch" not in pth_reader.__dict__
