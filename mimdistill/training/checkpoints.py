"""The training loop's Orbax checkpoints: `checkpoints/<step>/{state,data}`
of a workdir (async, atomic, keep the last N), the train state and the input
iterator position together. The teacher of a distillation is never in
`state`: `lineage.json` records where it came from (see `mimdistill.workdir`).
Reading a saved state's parts elsewhere: `mimdistill.interop.orbax_tree`.
"""

from __future__ import annotations

from typing import Any

import grain
import orbax.checkpoint as ocp

from mimdistill import workdir as workdir_lib
from mimdistill.paths import INSTALL_HINT

PyTree = Any


class Checkpointer:
  """Saves and restores `{'state': TrainState, 'data': iterator state}`."""

  def __init__(self, workdir, *, every_steps: int, keep: int = 3, async_save: bool = True):
    directory = workdir_lib.checkpoint_dir(workdir)
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
