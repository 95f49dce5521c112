"""SparK's emulation of sparse convolution on masked images (keyu-tian/SparK,
`pretrain/encoder.py`), as pure functions of an explicit mask.

SparK keeps a module-level `_cur_active` mask; here the mask is an argument,
`active`, a bool array `(B, f, f)` on the stride-32 grid (True = visible),
or None for the plain dense network (fine-tuning, evaluation: the same
weights). At a layer whose output is `H x W`, the mask is repeated
`H // f` times along H and `W // f` along W (nearest, block repetition;
`_get_active_ex_or_ii`). Then:

  * every conv / max-pool / avg-pool is the dense op on the zero-filled
    input followed by `* mask` at its output resolution (`sp_conv_forward`);
  * BatchNorm takes its statistics over the ACTIVE positions of the whole
    batch only (`SparseBatchNorm2d` = BatchNorm1d on the `(N_active, C)`
    rows) and writes 0 elsewhere (`BatchNorm` below with `active`);
  * LayerNorm is per position, so the sparse version is the dense one
    times the mask (`SparseConvNeXtLayerNorm(sparse=True)`);
  * ReLU / GELU are not masked (f(0) = 0) and residual adds stay sparse.

Under `jax.jit` over a batch sharded on a ('data',) mesh the sums in
`BatchNorm` run over the global batch, so the statistics are those of
SyncBN (`SparseSyncBatchNorm2d`) by construction: no collective to write.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# Downsampling ratio of every SparK encoder (`get_downsample_ratio`).
DOWNSAMPLE_RATIO = 32


def grid_size(image_size: int, ratio: int = DOWNSAMPLE_RATIO) -> int:
  """Side `f` of the mask grid; the image must be a multiple of `ratio`."""
  if image_size <= 0 or image_size % ratio:
    raise ValueError(
      f"image size {image_size} is not a multiple of {ratio}: the sparse CNN's mask lives on "
      f"the stride-{ratio} grid; use e.g. {max(ratio, image_size // ratio * ratio)}"
    )
  return image_size // ratio


def num_kept(grid: int, mask_ratio: float) -> int:
  """SparK's `len_keep = round(f * f * (1 - mask_ratio))` (Python round)."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  return round(grid * grid * (1 - mask_ratio))


def active_from_noise(noise: jax.Array, grid: int, mask_ratio: float) -> jax.Array:
  """`SparK.mask` for given noise `(B, f*f)`: the `len_keep` cells with the
  smallest noise are visible (row-major cells). Returns bool `(B, f, f)`."""
  b, cells = noise.shape
  if cells != grid * grid:
    raise ValueError(f"noise has {cells} cells per image, the {grid}x{grid} grid needs {grid**2}")
  keep = num_kept(grid, mask_ratio)
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (rank < keep).reshape(b, grid, grid)


def random_active(rng: jax.Array, batch: int, grid: int, mask_ratio: float) -> jax.Array:
  """A fresh SparK mask from uniform noise (`torch.rand(B, f*f).argsort`)."""
  return active_from_noise(jax.random.uniform(rng, (batch, grid * grid)), grid, mask_ratio)


def mask_at(active: jax.Array, height: int, width: int, dtype: Dtype = jnp.float32) -> jax.Array:
  """The `(B, f, f)` mask repeated to `(B, height, width, 1)` (nearest)."""
  _, fh, fw = active.shape
  if height % fh or width % fw:
    raise ValueError(f"a {height}x{width} map is not a whole multiple of the {fh}x{fw} mask grid")
  m = jnp.repeat(jnp.repeat(active, height // fh, axis=1), width // fw, axis=2)
  return m[..., None].astype(dtype)


def masked(x: jax.Array, active: jax.Array | None) -> jax.Array:
  """`x * mask` at x's resolution (NHWC), or x itself when dense."""
  if active is None:
    return x
  return x * mask_at(active, x.shape[1], x.shape[2], x.dtype)


class BatchNorm(nn.Module):
  """PyTorch BatchNorm2d over NHWC maps, optionally restricted to the active
  positions (SparK's `SparseBatchNorm2d`).

  Train: normalise with the batch mean and BIASED variance over the
  positions that count (all of (B, H, W) when dense; the active ones of the
  whole global batch when sparse), eps 1e-5; `running_mean <- (1 - m) * rm
  + m * mean`, `running_var <- (1 - m) * rv + m * var * n / (n - 1)` (torch
  keeps the UNBIASED variance), m = 0.1. Eval: the running statistics.
  Sparse outputs are exactly 0 at inactive positions.

  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (torch's
  weight, bias, running_mean, running_var; `num_batches_tracked` is only
  written at export, see `interop/cnn_names.py`).
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, active: jax.Array | None = None, train: bool = False):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    # Statistics in float32 at least (bfloat16 inputs), float64 if given.
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    m = None if active is None else mask_at(active, x.shape[1], x.shape[2], xf.dtype)
    if train:
      if m is None:
        count = jnp.asarray(xf.shape[0] * xf.shape[1] * xf.shape[2], xf.dtype)
        mean = jnp.mean(xf, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
      else:
        count = jnp.sum(m)
        mean = jnp.sum(xf * m, axis=(0, 1, 2)) / count
        # Two-pass variance, as torch computes it; inactive rows do not count.
        var = jnp.sum(jnp.square((xf - mean) * m), axis=(0, 1, 2)) / count
      if not self.is_initializing():
        unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    if m is not None:
      y = y * m
    return y.astype(self.dtype)


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm over channels at every position, eps 1e-6, two-pass biased
  variance (ConvNeXt's LayerNorm in both data formats). The sparse version
  (`SparseConvNeXtLayerNorm(sparse=True)`) is this followed by `masked`."""
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def max_pool(x: jax.Array, active: jax.Array | None = None) -> jax.Array:
  """ResNet stem `MaxPool2d(3, stride 2, padding 1)` (padding never wins:
  torch pads with -inf), then the mask (`SparseMaxPooling`)."""
  y = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return masked(y, active)
