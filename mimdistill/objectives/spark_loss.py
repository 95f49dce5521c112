"""SparK's pixel reconstruction loss (keyu-tian/SparK `SparK.forward`, step 4).

Patches of `p = 32` pixels (the encoder's downsampling ratio), vectors in
`(p, q, c)` order (`'bchpwq->bhwpqc'`, the same as MAE's patchify); the
target is each patch of the UNMASKED image standardised with its mean and
UNBIASED variance plus 1e-6; the per-patch mse is averaged over pixels, then
over the masked patches only (`sum(l2 * masked) / (sum(masked) + 1e-8)`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mimdistill.models.mae import patchify, unpatchify
from mimdistill.models.sparse import DOWNSAMPLE_RATIO
from mimdistill.objectives.mae_loss import pixel_targets


class SparKLoss(NamedTuple):
  loss: jax.Array  # scalar
  patch_l2: jax.Array  # (B, f*f) per-patch mse, row-major cells


def spark_loss(
  rec: jax.Array, images: jax.Array, active: jax.Array, patch: int = DOWNSAMPLE_RATIO
) -> SparKLoss:
  """`rec`, `images`: NHWC; `active`: bool `(B, f, f)`, True = visible."""
  target = pixel_targets(images, patch, norm_pix=True)
  l2 = jnp.mean((patchify(rec.astype(jnp.float32), patch) - target) ** 2, axis=-1)
  masked = 1.0 - active.reshape(active.shape[0], -1).astype(jnp.float32)
  loss = jnp.sum(l2 * masked) / (jnp.sum(masked) + 1e-8)
  return SparKLoss(loss, l2)


def reconstruction_image(
  rec: jax.Array, images: jax.Array, active: jax.Array, patch: int = DOWNSAMPLE_RATIO
) -> jax.Array:
  """SparK's `vis=True` picture: the input where visible, the reconstruction
  de-normalised with each patch's own mean / std where masked (NHWC)."""
  inp = patchify(images.astype(jnp.float32), patch)
  mean = inp.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(inp.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
  denorm = unpatchify(
    patchify(rec.astype(jnp.float32), patch) * std + mean, patch, images.shape[-1]
  )
  visible = jnp.repeat(jnp.repeat(active, patch, axis=1), patch, axis=2)[..., None]
  return jnp.where(visible, images.astype(jnp.float32), denorm)
