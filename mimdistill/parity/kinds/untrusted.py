"""Kind `untrusted`: a malicious `.pth` must be refused and nothing run."""

from __future__ import annotations

import os
import pathlib
import tempfile

from mimdistill.interop.pth_reader import UnsafeCheckpointError, load_pth


def check(folder, config, report):
  marker = config.get("marker_file", "untrusted_pickle_ran.txt")
  for name in config.get("checkpoints", {}) or [p.name for p in folder.glob("*.pth")]:
    path = (folder / name).resolve()
    # Run from an empty directory: a payload that ran would drop its marker
    # here (or next to the fixture), and we look in both places.
    with tempfile.TemporaryDirectory() as tmp:
      cwd = os.getcwd()
      os.chdir(tmp)
      try:
        load_pth(path)
        refused, detail = False, "the file loaded without error"
      except UnsafeCheckpointError as e:
        refused, detail = True, str(e)
      finally:
        os.chdir(cwd)
      ran = (pathlib.Path(tmp) / marker).exists() or (folder / marker).exists()
    report.check(folder.name, f"{name}:refused", refused, detail.splitlines()[0])
    report.check(
      folder.name, f"{name}:nothing_ran", not ran, f"marker {marker} appeared" if ran else ""
    )
