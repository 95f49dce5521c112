"""Runs the parity command on every fixture folder in ../shared/fixtures."""

import pathlib
import sys

import pytest
from conftest import SHARED

from mimdistill.parity.__main__ import available_kinds, main

FIXTURES = SHARED / "fixtures"
FOLDERS = sorted(p for p in FIXTURES.glob("*") if (p / "config.json").is_file())


def test_every_fixture_kind_has_a_checker():
  if not FOLDERS:
    pytest.skip(f"{FIXTURES} is absent (no ../shared next to this clone)")
  import json

  kinds = {json.loads((p / "config.json").read_text())["kind"] for p in FOLDERS}
  assert kinds <= set(available_kinds())


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_parity(folder: pathlib.Path, capsys, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  rc = main([str(folder)])
  out = capsys.readouterr().out
  assert rc == 0, out
  last = out.strip().splitlines()[-1]
  assert last.startswith("parity: ") and last.endswith(" 0 failed"), out
  assert not (tmp_path / "untrusted_pickle_ran.txt").exists()


def test_parity_command_never_imports_torch(tmp_path):
  """In a fresh process: other tests (tensorboardX) may import torch here."""
  import subprocess

  if not FOLDERS:
    pytest.skip(f"{FIXTURES} is absent (no ../shared next to this clone)")
  # The kinds that read .pth files and are cheap to run.
  folders = [str(p) for p in FOLDERS if p.name in ("untrusted", "finetune")]
  code = (
    "import sys; from mimdistill.parity.__main__ import main; "
    f"rc = main({folders!r}); "
    "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
  )
  import os

  from conftest import REPO

  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_parity_fails_on_a_wrong_expectation(tmp_path, capsys):
  """The command must be able to fail: a perturbed expected output fails."""
  import json
  import shutil

  import numpy as np

  src = FIXTURES / "posembed"
  if not src.is_dir():
    pytest.skip(f"{src} is absent")
  dst = tmp_path / "posembed_bad"
  shutil.copytree(src, dst)
  exp = dict(np.load(src / "expected.npz"))
  key = json.loads((src / "config.json").read_text())["cases"][0]["key"]
  exp[key] = exp[key] + 1e-3
  np.savez(dst / "expected.npz", **exp)
  assert main([str(dst)]) == 1
  assert "FAIL" in capsys.readouterr().out
