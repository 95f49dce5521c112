"""Metrics: JSON lines + TensorBoard events per workdir, a progress bar on
process 0. TensorBoard files are written with tensorboardX (no TensorFlow).

In a bucket workdir (gs://...) objects cannot be appended to, so both files
are kept in memory and the whole object is rewritten at each flush, as
tensorboardX's own GCS writer does; flushes happen at logging steps only.
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


class _BucketObject:
  """An append-only file in a bucket, for metrics.jsonl and the TensorBoard
  events: the content is kept in memory and the whole object rewritten at
  each flush."""

  def __init__(self, path: str | os.PathLike):
    self._path = epath.Path(path)
    self._data = bytearray(self._path.read_bytes() if self._path.exists() else b"")

  def write(self, data: bytes):
    self._data += data

  def flush(self):
    self._path.write_bytes(bytes(self._data))

  def close(self):
    self.flush()


def _open_append(path: epath.Path):
  return _BucketObject(path) if is_remote(path) else open(path, "ab")


class _BucketEventFactory:
  def open(self, path: str):
    return _BucketObject(path)

  def directory_check(self, path: str):
    pass  # buckets have no folders to create


def _register_bucket_event_writer():
  # tensorboardX's own 'gs' writer needs google-cloud-storage; epath already
  # reaches the bucket (through gcsfs), with the same credentials as Orbax.
  from tensorboardX import record_writer

  record_writer.register_writer_factory("gs", _BucketEventFactory())


def to_host(metrics) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
