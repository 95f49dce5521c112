"""Orbax checkpoints and the workdir records that link the stages.

A workdir holds:
  checkpoints/<step>/{state,data}   Orbax (async, atomic, keep last N): the
                                    train state and the input iterator state
  config.json                       the run's full config
  lineage.json                      stage, parent checkpoint (path, step)
The teacher of a distillation is never in `state`: `lineage.json` records
where it came from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mimdistill.paths import INSTALL_HINT, as_path

PyTree = Any


def checkpoint_dir(workdir) -> epath.Path:
  return as_path(workdir) / "checkpoints"


class Checkpointer:
  """Saves and restores `{'state': TrainState, 'data': iterator state}`."""

  def __init__(self, workdir, *, every_steps: int, keep: int = 3, async_save: bool = True):
    directory = checkpoint_dir(workdir)
    try:
      self.manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
          save_interval_steps=max(1, every_steps),
          max_to_keep=keep,
          enable_async_checkpointing=async_save,
          create=True,
        ),
      )
    except ImportError as e:
      # Orbax asks google-cloud-storage about a gs:// bucket's layout.
      raise ImportError(f"Orbax cannot reach {directory} ({e}); {INSTALL_HINT}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, data_iterator=None, force: bool = False) -> bool:
    """`data_iterator`: a grain iterator; its position is saved per process."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: PyTree, data_iterator=None):
    """Restores the state; moves `data_iterator` to the saved position."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def parse_source(source: str) -> tuple[epath.Path, int | None]:
  """`workdir` or `workdir:step` -> (workdir, step or None for the latest)."""
  path, _, step = str(source).rpartition(":")
  if path and step.isdigit():
    return as_path(path), int(step)
  return as_path(source), None


def numpy_restore_args(tree: PyTree) -> PyTree:
  """Orbax restore args that bring every leaf of `tree` back as host numpy."""
  return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


@dataclasses.dataclass(frozen=True)
class SavedState:
  """The `state` item of one saved step of a workdir, read on demand."""

  directory: epath.Path  # <workdir>/checkpoints
  step: int
  tree: PyTree  # metadata tree of `state` (shapes, dtypes; no data)
  handler: Any

  @property
  def location(self) -> str:
    return str(self.directory / str(self.step))

  def restore(self, item: PyTree) -> PyTree:
    """The leaves of `item` (a pruned copy of `tree`) as numpy; nothing else
    of the checkpoint (e.g. the optimizer state) is read."""
    with _read_only_manager(self.directory, self.handler) as manager:
      out = manager.restore(
        self.step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=item, restore_args=numpy_restore_args(item), partial_restore=True
          )
        ),
      )
    return out["state"]


def _read_only_manager(directory, handler) -> ocp.CheckpointManager:
  # The 'state' handler must be named: a fresh manager (another process than
  # the one that saved) otherwise returns no metadata for the item.
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": handler},
  )


def saved_state(source: str, handler=None) -> SavedState:
  """`workdir` (latest step) or `workdir:step` -> its `SavedState`."""
  workdir, step = parse_source(source)
  ckpt = checkpoint_dir(workdir)
  if not ckpt.is_dir():
    raise FileNotFoundError(
      f"no checkpoints in {workdir} (looked for {ckpt}); run the earlier "
      "stage there first or point at the right workdir"
    )
  handler = handler or ocp.PyTreeCheckpointHandler()
  with _read_only_manager(ckpt, handler) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt} holds no finished checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{ckpt} has no step {step}; it has {sorted(steps)}")
    meta = manager.item_metadata(step)["state"]
  return SavedState(ckpt, int(step), getattr(meta, "tree", meta), handler)


def restore_subtree(source: str, subtree: Sequence[str]) -> tuple[PyTree, dict]:
  """Restores only `state/<subtree...>` (e.g. ('params', 'encoder')) of a
  workdir's checkpoint as numpy arrays; the optimizer state is never read.

  Returns the subtree and `{'path', 'step'}` for the lineage record.
  """
  saved = saved_state(source)
  node = saved.tree
  for key in subtree:
    if not isinstance(node, dict) or key not in node:
      raise KeyError(
        f"checkpoint {saved.location} has no state/{'/'.join(subtree)} (stopped at {key!r})"
      )
    node = node[key]
  item = node
  for key in reversed(subtree):
    item = {key: item}
  node = saved.restore(item)
  for key in subtree:
    node = node[key]
  return node, {"path": saved.location, "step": saved.step}


def write_json(workdir, name: str, record: dict):
  if jax.process_index() != 0:
    return
  path = as_path(workdir) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
  tmp.replace(path)  # atomic: a crash never leaves half a file


def read_json(workdir, name: str) -> dict | None:
  path = as_path(workdir) / name
  return json.loads(path.read_text()) if path.is_file() else None
