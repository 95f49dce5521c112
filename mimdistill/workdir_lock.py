"""One writer per workdir: an exclusive lock held for the life of a run.

Two processes on one workdir would interleave their metrics and checkpoints
and leave a `config.json` that describes the other run, so a run takes
`<workdir>/.lock` and a second writer is refused with a message that names
the holder.

  * A local workdir: `fcntl.flock` on the lock file (the kernel releases it
    when the holder dies, even by SIGKILL), which records the holder's host,
    pid and start time. A lock file left by a process that is gone is taken
    over, with a warning that names it.
  * A `gs://` workdir: a lease object with an expiry time, renewed by a
    background thread while the run lives; an unexpired lease of another
    holder refuses the run, an expired one (a preempted holder) is taken over
    with a warning. Buckets have no atomic create-if-absent through epath, so
    after writing its lease a run reads it back and refuses if another holder
    won the race.

Only process 0 of a multi-host run takes the lock: the other hosts write
their own checkpoint shards under it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from mimdistill.paths import as_path, is_remote

log = logging.getLogger("mimdistill")
LOCK = ".lock"
LEASE_SECONDS = 600.0
RENEW_SECONDS = 60.0


class WorkdirBusyError(OSError):
  """Another live run holds the workdir."""


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(holder: dict) -> str:
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
  return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (since {since})"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` (see the module doc)."""

  def __init__(self, workdir, *, lease_seconds: float = LEASE_SECONDS):
    self.workdir = as_path(workdir)
    self.path = self.workdir / LOCK
    self.lease_seconds = lease_seconds
    self._fd = None
    self._stop = threading.Event()
    self._renewer = None
    self._held = False

  # -- local -----------------------------------------------------------------
  def _acquire_local(self) -> None:
    import fcntl

    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read_local(fd)
      os.close(fd)
      raise WorkdirBusyError(
        f"workdir {self.workdir} is in use by {_describe(holder)} (lock {self.path}); wait for "
        "that run to end or stop it, or use another --workdir"
      ) from None
    previous = self._read_local(fd)
    if previous:
      same_host = previous.get("host") == socket.gethostname()
      gone = same_host and not _alive(int(previous.get("pid", -1)))
      log.warning(
        "workdir %s: taking over the lock left by %s, %s",
        self.workdir,
        _describe(previous),
        "which is no longer running" if gone else "which no longer holds it",
      )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  @staticmethod
  def _read_local(fd) -> dict:
    try:
      data = os.pread(fd, 4096, 0)
      return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
      return {}

  def _release_local(self) -> None:
    import fcntl

    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)
      os.unlink(os.fspath(self.path))
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  # -- bucket -----------------------------------------------------------------
  def _lease(self) -> dict:
    return {**self._owner, "expires": time.time() + self.lease_seconds}

  def _acquire_remote(self) -> None:
    self._owner = _me()
    if self.path.exists():
      try:
        holder = json.loads(self.path.read_text())
      except ValueError:
        holder = {}
      if holder and holder.get("expires", 0) > time.time():
        raise WorkdirBusyError(
          f"workdir {self.workdir} is in use by {_describe(holder)}: its lease {self.path} runs "
          f"until {time.ctime(holder['expires'])}; wait for that run to end or stop it, or use "
          "another --workdir (a preempted holder's lease expires by itself)"
        )
      if holder:
        log.warning(
          "workdir %s: taking over the expired lease of %s", self.workdir, _describe(holder)
        )
    self.path.write_text(json.dumps(self._lease()))
    time.sleep(0.05)
    won = json.loads(self.path.read_text())
    if (won.get("host"), won.get("pid"), won.get("since")) != (
      self._owner["host"],
      self._owner["pid"],
      self._owner["since"],
    ):
      raise WorkdirBusyError(
        f"workdir {self.workdir} was taken by {_describe(won)} at the same moment; use another "
        "--workdir or start one run at a time"
      )
    self._renewer = threading.Thread(target=self._renew, daemon=True, name="workdir-lease")
    self._renewer.start()

  def _renew(self) -> None:
    while not self._stop.wait(RENEW_SECONDS):
      with contextlib.suppress(Exception):  # a missed renewal is retried; the lease is long
        self.path.write_text(json.dumps(self._lease()))

  def _release_remote(self) -> None:
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join(timeout=5)
    with contextlib.suppress(Exception):
      self.path.unlink()

  # -- public -----------------------------------------------------------------
  def __enter__(self) -> WorkdirLock:
    import jax

    if jax.process_index() != 0:
      return self
    if is_remote(self.workdir):
      self._acquire_remote()
    else:
      self._acquire_local()
    self._held = True
    return self

  def __exit__(self, *exc) -> None:
    if not self._held:
      return
    self._held = False
    if is_remote(self.workdir):
      self._release_remote()
    else:
      self._release_local()
