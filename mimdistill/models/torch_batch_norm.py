"""BatchNorm with PyTorch's `nn.BatchNorm2d` / `nn.SyncBatchNorm` semantics.

Differences from `flax.linen.BatchNorm` that the parity fixtures resolve:
  * the running variance is updated with the UNBIASED batch variance
    (`n / (n - 1)`), while the batch is normalised with the biased one;
  * `momentum` is torch's (the weight of the new batch, 0.1 by default);
  * `num_batches_tracked` is kept (torch counts every training forward), so
    an mmcv checkpoint converts to and from the Flax trees losslessly.

Statistics are over every axis but the last (channels) of the whole array:
under `jax.jit` with the batch sharded over devices that is the global
batch, i.e. SyncBN semantics without any collective written here. They are
computed in float32 at least (float64 inputs stay float64).

The training-mode normalisation has its own VJP, the textbook BatchNorm
backward `dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat))`, `g = dy *
weight`, except for exactly two values per channel (the PPM's 1x1 bin over
a batch of 2): there the centred `g` is exactly proportional to `x_hat`,
so the bracket equals `a * x_hat * eps * invstd^2` (`a` = that factor).
The textbook form computes this as a near-total cancellation whose float32
round-off is ~1e-4 of the small result (worse than torch's, whose CPU
kernel accumulates in float64); the closed form has none.

Variables: params `scale`, `bias` (torch `weight`, `bias`); `batch_stats`
`running_mean`, `running_var`, `num_batches_tracked` (int32).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance over all but the last axis
  (two-pass: E[x^2] - E[x]^2 loses float32 digits)."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - mean), axis=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_train(x, weight, bias, epsilon: float):
  """`(x - mean) / sqrt(var + eps) * weight + bias` over the batch."""
  return _normalize_fwd(x, weight, bias, epsilon)[0]


def _normalize_fwd(x, weight, bias, epsilon):
  mean, var = batch_moments(x)
  invstd = 1.0 / jnp.sqrt(var + epsilon)
  x_hat = (x - mean) * invstd
  return x_hat * weight + bias, (x_hat, weight, invstd)


def _normalize_bwd(epsilon, residuals, dy):
  x_hat, weight, invstd = residuals
  axes = tuple(range(x_hat.ndim - 1))
  g = dy * weight
  g_c = g - jnp.mean(g, axis=axes)
  proj = jnp.mean(g * x_hat, axis=axes)
  if math.prod(x_hat.shape[:-1]) == 2:
    sq = jnp.mean(x_hat * x_hat, axis=axes)
    a = proj / jnp.where(sq > 0, sq, 1.0)
    bracket = jnp.where(sq > 0, a * x_hat * (epsilon * invstd * invstd), g_c)
  else:
    bracket = g_c - x_hat * proj
  return bracket * invstd, jnp.sum(dy * x_hat, axis=axes), jnp.sum(dy, axis=axes)


normalize_train.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.Module):
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    running_mean = self.variable("batch_stats", "running_mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "running_var", jnp.ones, (c,), jnp.float32)
    tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
    xf = x.astype(jnp.result_type(x.dtype, jnp.float32))
    if train:
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(
          f"BatchNorm in training needs more than 1 value per channel, got input {x.shape}"
          " (torch refuses this too); use a larger batch or image"
        )
      if not self.is_initializing():
        m = self.momentum
        stats = jax.lax.stop_gradient(batch_moments(xf))
        new_mean = (1 - m) * running_mean.value + m * stats[0]
        new_var = (1 - m) * running_var.value + m * stats[1] * (n / (n - 1))
        running_mean.value = new_mean.astype(running_mean.value.dtype)
        running_var.value = new_var.astype(running_var.value.dtype)
        tracked.value = tracked.value + 1
      y = normalize_train(xf, scale, bias, self.epsilon)
    else:
      mean, var = running_mean.value, running_var.value
      y = (xf - mean) / jnp.sqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype or x.dtype)
