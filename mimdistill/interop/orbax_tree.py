"""Reading the state a workdir saved: its metadata tree, and any pruned part
of it as host numpy, without reading the rest (the optimizer state of a
ViT-L checkpoint is never touched when a later stage wants its encoder).

    saved = saved_state("W")          # or "W:step"; the latest step by default
    encoder = saved.restore({"params": {"encoder": saved.tree["params"]["encoder"]}})
    subtree, record = restore_subtree("W", ("params", "encoder"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mimdistill import workdir as workdir_lib

PyTree = Any


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
  workdir, step = workdir_lib.parse_source(source)
  ckpt = workdir_lib.checkpoint_dir(workdir)
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


def is_best_dir(path) -> bool:
  """A stage's `best/` folder (`<workdir>/best/<step>/params`, the one step
  the loop's best-checkpoint manager keeps)."""
  path = epath.Path(path)
  if not path.is_dir() or (path / workdir_lib.CHECKPOINTS).is_dir():
    return False
  return any(p.name.isdigit() and (p / "params").is_dir() for p in path.iterdir())


def _best_step(manager, path) -> tuple[int, PyTree]:
  """(latest step, its metadata tree) of an open `best/` manager."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{path} holds no finished best checkpoint")
  meta = manager.item_metadata(max(steps))["params"]
  return max(steps), getattr(meta, "tree", meta)


def _best_manager(path):
  return ocp.CheckpointManager(
    path,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"params": ocp.PyTreeCheckpointHandler()},
  )


def best_metadata(path) -> PyTree:
  """The tree (shapes and dtypes, nothing read) of a `best/` folder's latest
  step: `{'params', 'model_state'}`."""
  with _best_manager(epath.Path(path)) as manager:
    return _best_step(manager, path)[1]


def restore_best(path) -> tuple[PyTree, dict]:
  """`{'params', 'model_state'}` of a `best/` folder's latest step as numpy,
  and `{'path', 'step'}` for the lineage record."""
  path = epath.Path(path)
  with _best_manager(path) as manager:
    step, item = _best_step(manager, path)
    out = manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.PyTreeRestore(item=item, restore_args=numpy_restore_args(item))
      ),
    )
  return out["params"], {"path": str(path / str(step)), "step": int(step)}
