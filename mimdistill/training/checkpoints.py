"""The training loop's Orbax checkpoints: `checkpoints/<step>/{state,data}`
of a workdir (async, atomic, keep the last N), the train state and the input
iterator position together. The teacher of a distillation is never in
`state`: `lineage.json` records where it came from (see `mimdistill.workdir`).
Reading a saved state's parts elsewhere: `mimdistill.interop.orbax_tree`.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from mimdistill import workdir as workdir_lib
from mimdistill.paths import INSTALL_HINT

log = logging.getLogger("mimdistill")

PyTree = Any


class CheckpointDamagedError(OSError):
  """Every checkpoint of a workdir is damaged."""


def _write_replicated_arrays_whole() -> None:
  """In a single process, saves each replicated array from one device.

  Orbax's default on CPU and TPU (replica-parallel) cuts every replicated
  array into one slice per replica so that several hosts share the writing.
  In one process the same process writes every slice, so the cut buys
  nothing and costs one eager slice op per array and replica: 1,800 of them
  and 12 s per save of a small CNN on 8 CPU devices. Orbax's own default
  on GPU is the same whole-array write. Multi-process runs keep Orbax's
  default. Orbax takes this setting only from its global type-handler
  registry; the array metadata store of its default handler is kept.
  """
  if jax.process_count() > 1:
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(default, "_use_replica_parallel", False) is False:
    return
  try:
    whole = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False,
      array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
  except TypeError:  # an Orbax without replica-parallel saving
    return
  ocp.type_handlers.register_type_handler(jax.Array, whole, override=True)


class Checkpointer:
  """Saves and restores `{'state': TrainState, 'data': iterator state}`."""

  def __init__(self, workdir, *, every_steps: int, keep: int = 3, async_save: bool = True):
    _write_replicated_arrays_whole()
    self.directory = workdir_lib.checkpoint_dir(workdir)
    self._options = dict(
      save_interval_steps=max(1, every_steps),
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    try:
      return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(**self._options)
      )
    except ImportError as e:
      # Orbax asks google-cloud-storage about a gs:// bucket's layout.
      raise ImportError(f"Orbax cannot reach {self.directory} ({e}); {INSTALL_HINT}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _set_aside(self, step: int, why: str) -> None:
    """Moves a damaged step folder out of Orbax's sight (kept, not deleted)."""
    src = self.directory / str(step)
    dst = self.directory / f"{step}.damaged"
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.damaged{n}"
    log.warning(
      "checkpoint step %d in %s is damaged (%s); moved to %s, resuming from the one before",
      step,
      self.directory,
      why,
      dst.name,
    )
    src.rename(dst)

  def restore_latest(self, abstract_state: PyTree, data_iterator=None):
    """`(step, state)` of the newest intact checkpoint, or None when there is
    none. A damaged one (missing or truncated data, a deleted `state/` or
    metadata) is set aside with a warning that names its step, and the one
    before it is tried; when every one is damaged, one error says which
    folder to delete."""
    listed = set(self.manager.all_steps())
    damaged = {
      step: "not a finished Orbax checkpoint (its metadata is missing)"
      for step in set(workdir_lib.checkpoint_steps(self.directory.parent)) - listed
    }
    restored = None
    for step in sorted(listed, reverse=True):
      try:
        restored = (step, self.restore(step, abstract_state, data_iterator))
        break
      except Exception as e:  # TensorStore and Orbax raise many types for broken files
        text = str(e).strip()
        damaged[step] = text.splitlines()[0][:200] if text else type(e).__name__
    if restored is None and damaged:
      steps = ", ".join(str(s) for s in sorted(damaged))
      first = damaged[max(damaged)]
      raise CheckpointDamagedError(
        f"every checkpoint in {self.directory} is damaged (steps {steps}: {first}); delete "
        f"{self.directory} to start this stage over (or restore it from a backup)"
      )
    if damaged:
      for step, why in sorted(damaged.items()):
        self._set_aside(step, why)
      self.manager.close()
      self.manager = self._open()
    return restored

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
