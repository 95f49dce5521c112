"""SparK's per-iteration learning-rate and weight-decay schedules
(keyu-tian/SparK `pretrain/utils/lr_control.lr_wd_annealing` and
`downstream_imagenet/lr_decay.lr_wd_annealing`), as optax-style callables
of the step (`cur_it`).

lr: with `wp = round(warmup_steps)`, for step < wp a linear warmup from
0.5% of the peak, `0.005 * peak + 0.995 * peak * step / wp`; after it a
half-cycle cosine to 0.1% of the peak, `0.001 * peak + 0.999 * peak *
(0.5 + 0.5 * cos(pi * (step - wp) / (total - 1 - wp)))`.
Weight decay: pre-training anneals it with a cosine from `wd` to `wd_end`
over the whole run, `wd_end + (wd - wd_end) * (0.5 + 0.5 * cos(pi * step /
(total - 1)))`; fine-tuning keeps it constant.
A param group's values are these times its `lr_scale` / `weight_decay_scale`
(`training/cnn_layer_decay.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def _check(total_steps: int, warmup_steps: float):
  if total_steps < 2:
    raise ValueError(f"total_steps must be at least 2, got {total_steps}")
  if not 0 <= round(warmup_steps) < total_steps - 1:
    raise ValueError(
      f"warmup of {warmup_steps} steps leaves no cosine phase in {total_steps} steps; "
      "lower the warmup epochs or train longer"
    )


def spark_lr(peak_lr: float, warmup_steps: float, total_steps: int) -> Schedule:
  """SparK's lr at iteration `step` (0-based; `total_steps = ep * iters`)."""
  _check(total_steps, warmup_steps)
  wp = round(warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = 0.005 * peak_lr + 0.995 * peak_lr * step / max(wp, 1)
    ratio = (step - wp) / (total_steps - 1 - wp)
    cosine = 0.001 * peak_lr + 0.999 * peak_lr * (0.5 + 0.5 * jnp.cos(jnp.pi * ratio))
    return jnp.where(step < wp, warm, cosine)

  return schedule


def spark_weight_decay(wd: float, wd_end: float | None, total_steps: int) -> Schedule:
  """Pre-training's cosine from `wd` to `wd_end` (SparK's `--wde`, which
  defaults to `wd`); `wd_end=None` is fine-tuning's constant `wd`."""
  if wd_end is None:
    return lambda step: jnp.full(jnp.shape(step), wd, jnp.float32)
  if total_steps < 2:
    raise ValueError(f"total_steps must be at least 2, got {total_steps}")

  def schedule(step):
    ratio = jnp.asarray(step, jnp.float32) / (total_steps - 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(jnp.pi * ratio))

  return schedule
