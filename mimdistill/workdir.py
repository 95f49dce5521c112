"""A stage workdir: its layout and the records that link the stages.

The one definition of the schema every stage, the pipeline and the
converter read and write:

  checkpoints/<step>/{state,data}  Orbax: the train state and the input
                                   iterator position (training/checkpoints)
  config.json                      {'config': the run's full config,
                                    'signature': identity of the trained model}
  lineage.json                     {'stage', 'parent': where the weights it
                                    started from came from (path, step)}
  final_metrics.json               the last logged metrics of a finished run
  model.json                       a converted checkpoint's detected model
  stage_done.json                  the pipeline's record of a finished stage

A source (`teacher.source`, `init.source`, a conversion source) names a
workdir as `W` (latest step) or `W:step`.
"""

from __future__ import annotations

import json

import jax
from etils import epath

from mimdistill.paths import as_path

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
LINEAGE = "lineage.json"
FINAL_METRICS = "final_metrics.json"
MODEL = "model.json"
STAGE_DONE = "stage_done.json"


def checkpoint_dir(workdir) -> epath.Path:
  return as_path(workdir) / CHECKPOINTS


def checkpoint_steps(workdir) -> list[int]:
  """Steps with a checkpoint folder, ascending (finished or not)."""
  ckpt = checkpoint_dir(workdir)
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def has_checkpoints(workdir) -> bool:
  return bool(checkpoint_steps(workdir))


def parse_source(source: str) -> tuple[epath.Path, int | None]:
  """`workdir` or `workdir:step` -> (workdir, step or None for the latest)."""
  path, _, step = str(source).rpartition(":")
  if path and step.isdigit():
    return as_path(path), int(step)
  return as_path(source), None


def write_json(workdir, name: str, record: dict) -> None:
  """Writes `workdir/name` atomically, on process 0 only."""
  if jax.process_index() != 0:
    return
  path = as_path(workdir) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
  tmp.replace(path)  # a crash never leaves half a file


def read_json(workdir, name: str) -> dict | None:
  path = as_path(workdir) / name
  return json.loads(path.read_text()) if path.is_file() else None


def signature(workdir) -> dict:
  """The identity of the model a workdir trained (empty if unknown)."""
  return (read_json(workdir, CONFIG) or {}).get("signature") or {}
