"""Resampling exactly as PyTorch computes it, on NHWC arrays.

* `resize_bilinear`: `F.interpolate(x, size, mode='bilinear',
  align_corners=False)` without antialias, also when shrinking (mmseg's
  `resize`). `jax.image.resize` antialiases when shrinking, so it is not
  used; the two taps per axis are gathered instead, which is exact in any
  matmul precision (a resampling matrix product would be rounded to
  bfloat16 by TPU/GPU default precision).
* `adaptive_avg_pool`: `nn.AdaptiveAvgPool2d(s)`; bin i of n inputs
  covers `[floor(i*n/s), ceil((i+1)*n/s))` (bins overlap, or repeat an
  input, when n is not a multiple of s or n < s).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(i0, i1, w1)` of torch's `upsample_bilinear2d` along one axis
  (align_corners=False): source `max((dst + 0.5) * in / out - 0.5, 0)`,
  computed in float32 as torch does for float32 inputs; output = `(1 - w1)
  * x[i0] + w1 * x[i1]`."""
  scale = np.float32(in_size / out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, w1


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  i0, i1, w1 = linear_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w1 = jnp.asarray(w1, x.dtype).reshape(shape)
  w0 = jnp.asarray(1.0, x.dtype) - w1
  return w0 * jnp.take(x, jnp.asarray(i0), axis=axis) + w1 * jnp.take(x, jnp.asarray(i1), axis=axis)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC `x` resized to `size = (H, W)` as torch's bilinear
  `F.interpolate(align_corners=False)`; width first, then height, the order
  in which torch's kernel combines the four taps."""
  h, w = int(size[0]), int(size[1])
  if x.shape[1:3] == (h, w):
    return x  # torch copies the input when the size is unchanged
  return _resize_axis(_resize_axis(x, 2, w), 1, h)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`(out, in)` float32 averaging matrix of `AdaptiveAvgPool` along one axis."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = math.ceil((i + 1) * in_size / out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
  """NHWC `x` -> `(B, s_h, s_w, C)` as `nn.AdaptiveAvgPool2d(size)`. The
  mean over a rectangular bin is the product of the per-axis means, so it is
  two small averaging products (at HIGHEST precision: they are cheap and
  the bin weights like 1/3 must not be rounded)."""
  sh, sw = (size, size) if isinstance(size, int) else size
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], sh), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], sw), x.dtype)
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("bhwc,vw->bhvc", x, pw, precision=hp)
  return jnp.einsum("bhvc,uh->buvc", y, ph, precision=hp)
