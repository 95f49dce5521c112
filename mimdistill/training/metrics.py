"""Metrics: JSON lines + TensorBoard events per workdir, a progress bar on
process 0. TensorBoard files are written with tensorboardX (no TensorFlow)."""
from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, total_steps: int,
               initial_step: int = 0, desc: str = "train"):
    self.primary = jax.process_index() == 0
    self.workdir = pathlib.Path(workdir)
    self._jsonl = None
    self._tb = None
    self._bar = None
    if self.primary:
      from tensorboardX import SummaryWriter
      from tqdm import tqdm
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
      self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc,
                       unit="step", dynamic_ncols=True)
    self._last = (time.perf_counter(), initial_step)

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train"):
    if not self.primary:
      return
    record = {"step": int(step), "prefix": prefix, "time": time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
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
      self._bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()},
                             "img/s": f"{rate:.1f}"})
    return rate

  def close(self):
    if self.primary:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()


def to_host(metrics) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
