"""The parity command on every fixture case: the copies in tests/fixtures
(always there, also on a user's clone) and the cases of ../shared/fixtures
of kinds the copy lacks (a developer checkout)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from mimdistill.parity.__main__ import COPIED, SHARED, available_kinds, default_cases, main

CASES = default_cases()


def test_every_fixture_kind_has_a_checker():
  kinds = {json.loads((p / "config.json").read_text())["kind"] for p in CASES}
  missing = kinds - set(available_kinds())
  assert not missing, f"fixture kinds without a parity checker: {sorted(missing)}"


@pytest.mark.parametrize("folder", CASES, ids=[p.name for p in CASES])
def test_parity(folder: pathlib.Path, capsys, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  rc = main([str(folder)])
  out = capsys.readouterr().out
  assert rc == 0, out
  last = out.strip().splitlines()[-1]
  assert last.startswith("parity: ") and last.endswith(" 0 failed"), out
  assert not (tmp_path / "untrusted_pickle_ran.txt").exists()


def test_default_run_checks_the_copied_fixtures_without_shared_and_without_torch(tmp_path):
  """In a fresh process that cannot see ../shared (the command's shared
  folder pointed elsewhere) and may not import torch: the copied fixtures
  alone, the cheap .pth-reading kinds."""
  code = (
    "import sys, pathlib; sys.modules['torch'] = None\n"
    "import mimdistill.parity.__main__ as p\n"
    "p.SHARED = pathlib.Path('/nonexistent')\n"
    "cases = p.default_cases()\n"
    "assert cases and all(str(c).startswith(str(p.COPIED)) for c in cases), cases\n"
    "rc = p.main([str(p.COPIED / 'untrusted'), str(p.COPIED / 'finetune'), str(p.COPIED / 'schedule')])\n"
    "sys.exit(rc)"
  )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1].endswith(" 0 failed")


def test_parity_fails_on_a_wrong_expectation(tmp_path, capsys):
  """The command must be able to fail: a perturbed expected output fails."""
  src = COPIED / "posembed"
  dst = tmp_path / "posembed_bad"
  shutil.copytree(src, dst)
  exp = dict(np.load(src / "expected.npz"))
  key = json.loads((src / "config.json").read_text())["cases"][0]["key"]
  exp[key] = exp[key] + 1e-3
  np.savez(dst / "expected.npz", **exp)
  assert main([str(dst)]) == 1
  assert "FAIL" in capsys.readouterr().out


def test_copied_fixtures_equal_the_shared_ones():
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent (no ../shared next to this clone)")
  # Folders we made ourselves (clip_torchscript: a TorchScript archive) have no shared copy.
  for case in sorted(p for p in COPIED.iterdir() if (SHARED / p.name).is_dir()):
    for f in sorted(case.iterdir()):
      assert f.read_bytes() == (SHARED / case.name / f.name).read_bytes(), f
