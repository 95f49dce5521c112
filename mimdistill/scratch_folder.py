"""The scratch folder of a check script (`launch/kill_resume_check.py`,
`launch/measure_convert_memory.py`): wiped at the start of every run, so it
is only ever a folder the script made itself (it holds a marker file) or a
new or empty one. A mistyped `--dir=workdirs` must not delete real runs."""

from __future__ import annotations

import pathlib
import shutil

MARKER = ".mimdistill_scratch"


def fresh(path: str | pathlib.Path, owner: str) -> pathlib.Path:
  """Empties `path` (a folder `owner` made before, or a new or empty one) and
  marks it as `owner`'s; raises ValueError, deleting nothing, for any other
  folder or a file."""
  root = pathlib.Path(path)
  if root.exists() and not root.is_dir():
    raise ValueError(f"--dir={root} is a file; pass a new or empty folder")
  if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
    raise ValueError(
      f"--dir={root} is a non-empty folder {owner} did not create; its contents would be "
      "deleted: pass a new or empty folder"
    )
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  (root / MARKER).write_text(f"scratch folder of {owner}; emptied on its next run\n")
  return root
