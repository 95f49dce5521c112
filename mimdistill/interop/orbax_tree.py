"""Reading the state a workdir saved: its metadata tree, and any pruned part
of it as host numpy, without reading the rest (the optimizer state of a
ViT-L checkpoint is never touched when a later stage wants its encoder).

    saved = saved_state("W")          # or "W:step"; the latest step by default
    encoder = saved.restore({"params": {"encoder": saved.tree["params"]["encoder"]}})
    subtree, record = restore_subtree("W", ("params", "encoder"))

A stage's `best/` folder (`W/best`, the best evaluated step) reads the same
way: its one item, `params`, holds `{'params', 'model_state'}` as `state`
does, so every reader of a workdir takes it unchanged.
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
  """The `state` item of one saved step of a workdir (or the `params` item
  of a `best/` folder), read on demand."""

  directory: epath.Path  # <workdir>/checkpoints, or <workdir>/best
  step: int
  tree: PyTree  # metadata tree of the item (shapes, dtypes; no data)
  handler: Any
  item: str = "state"

  @property
  def location(self) -> str:
    return str(self.directory / str(self.step))

  def restore(self, item: PyTree) -> PyTree:
    """The leaves of `item` (a pruned copy of `tree`) as numpy; nothing else
    of the checkpoint (e.g. the optimizer state) is read."""
    with _read_only_manager(self.directory, self.handler, self.item) as manager:
      out = manager.restore(
        self.step,
        args=ocp.args.Composite(
          **{
            self.item: ocp.args.PyTreeRestore(
              item=item, restore_args=numpy_restore_args(item), partial_restore=True
            )
          }
        ),
      )
    return out[self.item]


def _read_only_manager(directory, handler, item: str = "state") -> ocp.CheckpointManager:
  # The item's handler must be named: a fresh manager (another process than
  # the one that saved) otherwise returns no metadata for the item.
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={item: handler},
  )


def saved_state(source: str, handler=None) -> SavedState:
  """`workdir` (latest step), `workdir:step` or a `best/` folder -> its
  `SavedState`."""
  workdir, step = workdir_lib.parse_source(source)
  if is_best_dir(workdir):
    ckpt, item = epath.Path(workdir), "params"
  else:
    ckpt, item = workdir_lib.checkpoint_dir(workdir), "state"
  if not ckpt.is_dir():
    raise FileNotFoundError(
      f"no checkpoints in {workdir} (looked for {ckpt}); run the earlier "
      "stage there first or point at the right workdir"
    )
  handler = handler or ocp.PyTreeCheckpointHandler()
  with _read_only_manager(ckpt, handler, item) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt} holds no finished checkpoint")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise FileNotFoundError(f"{ckpt} has no step {step}; it has {sorted(steps)}")
    meta = manager.item_metadata(step)[item]
  return SavedState(ckpt, int(step), getattr(meta, "tree", meta), handler, item)


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
        f"checkpoint {saved.location} has no {saved.item}/{'/'.join(subtree)} (stopped at {key!r})"
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


def holds_checkpoints(path) -> bool:
  """A workdir with a `checkpoints/` folder, or a `best/` folder: what
  `saved_state` reads."""
  return (epath.Path(path) / workdir_lib.CHECKPOINTS).is_dir() or is_best_dir(path)


def restore_best(path) -> tuple[PyTree, dict]:
  """`{'params', 'model_state'}` of a `best/` folder's latest step as numpy,
  and `{'path', 'step'}` for the lineage record."""
  saved = saved_state(path)
  return saved.restore(saved.tree), {"path": saved.location, "step": saved.step}
