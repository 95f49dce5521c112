"""Metrics: JSON lines + TensorBoard events per workdir, a progress bar on
process 0. TensorBoard files are written with tensorboardX (no TensorFlow).

In a bucket workdir (gs://...) objects cannot be appended to. Rewriting the
whole object at each log step (what tensorboardX's own GCS writer does)
costs bytes quadratic in the run's length, so there each flush writes only
what it adds, as a new numbered part object: `metrics.jsonl` becomes
`metrics.jsonl.<n>` parts (read back in order by `read_metrics_lines`), an
event file becomes `<event file>.<n>` parts (TensorBoard reads every file
with 'tfevents' in its name and merges them). Parts are flushed at most every
`BUCKET_FLUSH_SECONDS` and at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath

from mimdistill.paths import as_path, is_remote


class MetricWriter:
  def __init__(
    self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0, desc: str = "train"
  ):
    self.primary = jax.process_index() == 0
    self.workdir = as_path(workdir)
    self._jsonl = None
    self._tb = None
    self._bar = None
    if self.primary:
      from tensorboardX import SummaryWriter
      from tqdm import tqdm

      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = _open_append(self.workdir / "metrics.jsonl")
      if is_remote(self.workdir):
        _register_bucket_event_writer()
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
      self._bar = tqdm(
        total=total_steps, initial=initial_step, desc=desc, unit="step", dynamic_ncols=True
      )
    self._last = (time.perf_counter(), initial_step)

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train"):
    if not self.primary:
      return
    record = {"step": int(step), "prefix": prefix, "time": time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write((json.dumps(record) + "\n").encode("utf-8"))
    self._jsonl.flush()
    for k, v in metrics.items():
      if math.isfinite(float(v)):
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self._tb.flush()

  def progress(self, step: int, images_per_step: int, **shown):
    """Advances the bar and returns the img/s since the last call."""
    now = time.perf_counter()
    t0, s0 = self._last
    rate = (step - s0) * images_per_step / max(now - t0, 1e-9)
    self._last = (now, step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()}, "img/s": f"{rate:.1f}"})
    return rate

  def close(self):
    if self.primary:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()


BUCKET_FLUSH_SECONDS = 30.0


class _BucketParts:
  """An append-only file in a bucket, as numbered part objects: each flush
  writes the bytes added since the last one (at most every
  `BUCKET_FLUSH_SECONDS`, and always at close)."""

  def __init__(self, path: str | os.PathLike):
    self._path = epath.Path(path)
    parent, name = self._path.parent, self._path.name
    taken = [
      int(p.name.rsplit(".", 1)[1])
      for p in parent.glob(f"{name}.*")
      if p.name.rsplit(".", 1)[1].isdigit()
    ]
    self._next = max(taken, default=0) + 1  # a resumed run continues the numbering
    self._pending = bytearray()
    self._last = time.monotonic()

  def write(self, data: bytes):
    self._pending += data

  def flush(self, force: bool = False):
    if not self._pending or (not force and time.monotonic() - self._last < BUCKET_FLUSH_SECONDS):
      return
    part = self._path.parent / f"{self._path.name}.{self._next:06d}"
    part.write_bytes(bytes(self._pending))
    self._next += 1
    self._pending = bytearray()
    self._last = time.monotonic()

  def close(self):
    self.flush(force=True)


def _open_append(path: epath.Path):
  return _BucketParts(path) if is_remote(path) else open(path, "ab")


class _BucketEventFactory:
  def open(self, path: str):
    return _BucketParts(path)

  def directory_check(self, path: str):
    pass  # buckets have no folders to create


def _register_bucket_event_writer():
  # tensorboardX's own 'gs' writer needs google-cloud-storage; epath already
  # reaches the bucket (through gcsfs), with the same credentials as Orbax.
  from tensorboardX import record_writer

  record_writer.register_writer_factory("gs", _BucketEventFactory())


def to_host(metrics) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def read_metrics_lines(path: str | os.PathLike) -> list[str]:
  """The lines of a workdir's metrics file: `metrics.jsonl` itself, or its
  numbered bucket parts in order."""
  path = as_path(path)
  if path.is_file():
    return path.read_text(encoding="utf-8").splitlines()
  parts = sorted(
    (p for p in path.parent.glob(f"{path.name}.*") if p.name.rsplit(".", 1)[1].isdigit()),
    key=lambda p: int(p.name.rsplit(".", 1)[1]),
  )
  return [line for p in parts for line in p.read_text(encoding="utf-8").splitlines()]
