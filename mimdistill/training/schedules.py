"""Learning-rate schedules, built with optax.

`warmup_cosine` is MAE's `util/lr_sched.adjust_learning_rate` evaluated per
step with `epoch = step / steps_per_epoch`: linear warmup from 0 to `peak`,
then a half-cycle cosine from `peak` to `end`. optax's
`warmup_cosine_decay_schedule` computes exactly that formula.

`beit_cosine_values` is BEiT / CAE's per-step table (`utils.cosine_scheduler`),
whose warmup ends ON the peak; `from_values` turns such a table into an optax
schedule.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax


def warmup_cosine(peak: float, end: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f"warmup_steps={warmup_steps} must be in [0, total_steps="
      f"{total_steps}); lower warmup_epochs or train longer"
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=end,
  )


def from_epochs(
  peak: float, end: float, epochs: float, warmup_epochs: float, steps_per_epoch: int
) -> optax.Schedule:
  """The schedule in the official epoch units (rounded to whole steps)."""
  return warmup_cosine(
    peak, end, int(round(epochs * steps_per_epoch)), int(round(warmup_epochs * steps_per_epoch))
  )


def beit_cosine_values(
  base: float,
  final: float,
  epochs: int,
  steps_per_epoch: int,
  warmup_epochs: int = 0,
  start_warmup: float = 0.0,
  warmup_steps: int = -1,
) -> np.ndarray:
  """BEiT / CAE `utils.cosine_scheduler`: one value per step. The warmup is
  `np.linspace(start_warmup, base, warmup_steps)` (endpoint included, so
  the last warmup step is already at `base`), then `final + (base - final)
  (1 + cos(pi i / n)) / 2` for i = 0..n-1 over the remaining n steps."""
  warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * steps_per_epoch
  warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
  rest = epochs * steps_per_epoch - warmup_iters
  if rest <= 0:
    raise ValueError(
      f"warmup of {warmup_iters} steps leaves no cosine steps of the {epochs * steps_per_epoch}"
    )
  i = np.arange(rest)
  cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / rest))
  return np.concatenate([warmup, cosine]).astype(np.float64)


def from_values(values, offset: int = 0) -> optax.Schedule:
  """A schedule reading a per-step table (held at its last value past the
  end); `offset` is the first step's index (the official `start_steps`)."""
  table = np.asarray(values, np.float32)

  def schedule(count):
    index = jnp.clip(count + offset, 0, len(table) - 1)
    return jnp.asarray(table)[index]

  return schedule
