"""MAE pixel-reconstruction loss (official `forward_loss`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimdistill.models.mae import patchify


def pixel_targets(images: jax.Array, patch: int, norm_pix: bool) -> jax.Array:
  """Patchified targets; with `norm_pix` each patch is standardised using the
  UNBIASED variance (torch's `Tensor.var` default) plus 1e-6."""
  target = patchify(images.astype(jnp.float32), patch)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def mae_loss(
  pred: jax.Array, images: jax.Array, mask: jax.Array, patch: int, norm_pix: bool
) -> jax.Array:
  """Mean squared error per patch, averaged over removed patches only."""
  target = pixel_targets(images, patch, norm_pix)
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)
