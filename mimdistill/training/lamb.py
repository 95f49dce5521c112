"""LAMB exactly as timm 0.5.4 `timm/optim/lamb.py` steps it (the copy SparK
pre-trains with, `pretrain/utils/lamb.py:TheSameAsTimmLAMB`, and the one its
fine-tuning builds, `Lamb(max_grad_norm=1e7, always_adapt=True,
bias_correction=False)`), as an optax transformation.

Per parameter, with the step t counted from 1:
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)      bc_i = 1 - b_i^t, or 1
    u = u + wd * p                                    wd = this param's decay
    u = u * trust       if wd != 0 or always_adapt,   trust = |p| / |u| (1 if
                                                      either norm is 0)
    p = p - lr * u

Differences from `optax.lamb`: the bias correction can be off, the
weight-decay rate is a schedule times a per-parameter scale (SparK's
`weight_decay_scale`, 0 for 1-D params), and a parameter without weight
decay skips the trust ratio unless `always_adapt`. timm's global-norm
clipping (`max_grad_norm`) is `optax.clip_by_global_norm` before this
transformation (timm divides the gradients by `max(norm / max_norm, 1)`,
the same thing).

The returned updates are `-u` WITHOUT the learning rate: chain the lr (and a
per-parameter lr scale) after it, as `training/cnn_optimizer.py` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class LambState(NamedTuple):
  count: jax.Array
  mu: PyTree
  nu: PyTree


def scale_by_timm_lamb(
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  weight_decay: float | Callable[[jax.Array], jax.Array] = 0.0,
  weight_decay_scales: PyTree | None = None,
  bias_correction: bool = True,
  always_adapt: bool = False,
) -> optax.GradientTransformation:
  """See the module docstring. `weight_decay` is a number or a schedule of
  the update count (0-based); `weight_decay_scales` a tree of per-parameter
  factors (None: 1 everywhere)."""
  wd_schedule = weight_decay if callable(weight_decay) else (lambda _: weight_decay)

  def init(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)
    return LambState(
      jnp.zeros((), jnp.int32),
      jax.tree_util.tree_map(zeros, params),
      jax.tree_util.tree_map(zeros, params),
    )

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("LAMB needs the params (for weight decay and the trust ratio)")
    t = state.count + 1
    tf = t.astype(jnp.float32)
    bc1 = 1.0 - b1**tf if bias_correction else 1.0
    bc2 = 1.0 - b2**tf if bias_correction else 1.0
    wd = jnp.asarray(wd_schedule(state.count), jnp.float32)
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, grads)
    scales = (
      weight_decay_scales
      if weight_decay_scales is not None
      else jax.tree_util.tree_map(lambda _: 1.0, params)
    )

    def step(m, v, p, scale):
      p = p.astype(jnp.float32)
      u = (m / bc1) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps)
      decay = wd * scale
      u = u + decay * p
      w_norm, u_norm = jnp.linalg.norm(p.ravel()), jnp.linalg.norm(u.ravel())
      trust = jnp.where((w_norm > 0) & (u_norm > 0), w_norm / jnp.where(u_norm > 0, u_norm, 1), 1.0)
      adapt = jnp.logical_or(always_adapt, decay != 0)
      return -jnp.where(adapt, trust, 1.0) * u

    updates = jax.tree_util.tree_map(step, mu, nu, params, scales)
    return updates, LambState(t, mu, nu)

  return optax.GradientTransformation(init, update)
