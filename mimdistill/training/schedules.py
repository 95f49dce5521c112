"""Learning-rate schedules, built with optax.

`warmup_cosine` is MAE's `util/lr_sched.adjust_learning_rate` evaluated per
step with `epoch = step / steps_per_epoch`: linear warmup from 0 to `peak`,
then a half-cycle cosine from `peak` to `end`. optax's
`warmup_cosine_decay_schedule` computes exactly that formula.
"""

from __future__ import annotations

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
