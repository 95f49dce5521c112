"""mmcv 1.3's `PolyLrUpdaterHook` with warmup by iteration (`by_epoch=
False`), as optax-style schedules of the iteration `it` (mmcv's
`runner.iter` before the step: 0 for the first step).

    regular(it) = (initial_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    it < warmup_iters, 'linear':   regular * (1 - (1 - it / warmup_iters) * (1 - ratio))
                       'constant': regular * ratio
                       'exp':      regular * ratio ** (1 - it / warmup_iters)
    otherwise:                     regular

The warmup multiplies the already-decayed poly value; each param group runs
this from its own initial lr. Iterations past `max_iters` hold `min_lr`
(mmcv would raise a negative number to `power` there).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

WARMUPS = (None, "linear", "constant", "exp")


def poly_warmup(
  initial_lr: float,
  max_iters: int,
  *,
  power: float = 1.0,
  min_lr: float = 0.0,
  warmup: str | None = "linear",
  warmup_iters: int = 0,
  warmup_ratio: float = 0.1,
) -> optax.Schedule:
  if warmup not in WARMUPS:
    raise ValueError(f"warmup={warmup!r}; use one of {WARMUPS}")
  if max_iters <= 0:
    raise ValueError(f"max_iters must be positive, got {max_iters}")
  if warmup is not None and warmup_iters <= 0:
    raise ValueError(f"warmup={warmup!r} needs warmup_iters > 0, got {warmup_iters}")
  if not 0 < warmup_ratio <= 1:
    raise ValueError(f"warmup_ratio must be in (0, 1], got {warmup_ratio}")

  def schedule(it):
    it = jnp.minimum(jnp.asarray(it, jnp.result_type(float)), max_iters)
    lr = (initial_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if warmup is None:
      return lr
    t = it / warmup_iters
    if warmup == "linear":
      # = 1 - (1 - t) * (1 - ratio), mmcv's form, without its float32
      # cancellation (at t = 0 that form gives 1.013e-6 for ratio 1e-6).
      factor = warmup_ratio + t * (1 - warmup_ratio)
    elif warmup == "constant":
      factor = warmup_ratio
    else:
      factor = warmup_ratio ** (1 - t)
    return jnp.where(it < warmup_iters, lr * factor, lr)

  return schedule
