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


# Config fields that may change when a run resumes (they change how a run is
# logged, saved, placed or computed, not what it trains): anything else that
# differs from the saved config is refused (`config_changes`).
RESUMABLE = (
  "preset",
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "async_checkpoints",
  "eval_every",
  "num_visualize",
  "figures",
  "mesh.*",
  "data.data_dir",
  "data.num_workers",
  "data.read_threads",
  "data.prefetch",
  "*.fused_attention",
  "*.remat",
  "*.scan_blocks",
)
# A longer (or shorter) run of the same stage resumes too.
LENGTH = ("total_epochs", "total_steps")


def flatten(config: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_changes(old: dict, new: dict, ignore=RESUMABLE) -> list[tuple[str, object, object]]:
  """`(field, old value, new value)` of every field that differs between two
  config dicts, but for the fields matching `ignore` (fnmatch patterns)."""
  import fnmatch

  a, b = flatten(old), flatten(new)
  fields = sorted(set(a) | set(b))
  skip = lambda f: any(fnmatch.fnmatchcase(f, p) for p in ignore)
  missing = object()
  out = []
  for f in fields:
    x, y = a.get(f, missing), b.get(f, missing)
    if skip(f) or _same(x, y):
      continue
    out.append((f, None if x is missing else x, None if y is missing else y))
  return out


def _same(x, y) -> bool:
  # JSON turns tuples into lists.
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return norm(x) == norm(y)


def describe_changes(changes, limit: int = 6) -> str:
  shown = "; ".join(f"{f}: {a!r} there, {b!r} now" for f, a, b in changes[:limit])
  return shown + (f"; ... {len(changes) - limit} more" if len(changes) > limit else "")
