"""Masked autoencoder (MAE, He et al. 2022) with the official code's semantics.

Params: `{'encoder': <ViTEncoder params>, 'decoder': {embed, mask_token,
blocks_<i>, norm, pred}}`. The encoder subtree is exactly a ViT encoder's
params, so a later stage restores it as a teacher or student by name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models.vit import Block, ViTEncoder, dense_init, layer_norm, run_block_stack

Dtype = Any


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """NHWC images -> `(B, L, p*p*C)` in MAE's `nchpwq -> nhwpqc` order."""
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  x = images.reshape(b, gh, patch, gw, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # b, gh, gw, p, q, c
  return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  """Inverse of `patchify` for square images."""
  b, l, _ = patches.shape
  g = int(round(l**0.5))
  x = patches.reshape(b, g, g, patch, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


class Masking(NamedTuple):
  ids_keep: jax.Array  # (B, len_keep) int32: indices of visible patches
  mask: jax.Array  # (B, L) float32: 1 = removed, in original order
  ids_restore: jax.Array  # (B, L) int32: unshuffle indices


def num_visible(num_patches: int, mask_ratio: float) -> int:
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
  return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(ratio: float, num_patches: int, field: str) -> None:
  """A ratio in (0, 1) that leaves at least one patch visible."""
  if not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
    raise ValueError(f"{field}={ratio!r} must be in (0, 1); the MAE recipe uses 0.75")
  if num_visible(num_patches, ratio) < 1:
    most = 1 - 1 / num_patches
    raise ValueError(
      f"{field}={ratio} leaves no visible patch of {num_patches}; use at most {most:.4f}"
    )


def random_masking(noise: jax.Array, mask_ratio: float) -> Masking:
  """MAE's per-sample shuffle: keep the patches with the smallest noise."""
  b, l = noise.shape
  keep = num_visible(l, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :keep]
  mask = jnp.ones((b, l), jnp.float32).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return Masking(ids_keep.astype(jnp.int32), mask, ids_restore.astype(jnp.int32))


class MAEDecoder(nn.Module):
  width: int
  depth: int
  num_heads: int
  num_patches: int
  out_dim: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  scan_blocks: bool = False  # see `vit.run_block_stack`

  def setup(self):
    self.embed = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
    grid = int(round(self.num_patches**0.5))
    self.pos_embed = self.variable(
      "fixed", "pos_embed", lambda: jnp.asarray(pos_embed_lib.sincos_2d(self.width, grid)[None])
    )
    self.blocks = [
      Block(self.width, self.num_heads, self.mlp_ratio, dtype=self.dtype, remat=self.remat)
      for _ in range(self.depth)
    ]
    self.norm = layer_norm(dtype=self.dtype)
    self.pred = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init)

  def __call__(self, latent, ids_restore, train: bool = False):
    x = self.embed(latent)
    b, n_vis, d = x.shape
    n_mask = ids_restore.shape[1] + 1 - n_vis
    masks = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, n_mask, d))
    patches = jnp.concatenate([x[:, 1:], masks], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + self.pos_embed.value.astype(x.dtype)
    x = run_block_stack(self, self.blocks, x, train, scan=self.scan_blocks, remat=self.remat)
    x = self.pred(self.norm(x))
    return x[:, 1:]


class MAEOutput(NamedTuple):
  latent: jax.Array  # (B, 1+len_keep, D) encoder output (after final norm)
  pred: jax.Array  # (B, L, p*p*C) pixel predictions, patchify order
  masking: Masking


class MAE(nn.Module):
  """Encoder on visible patches + lightweight decoder predicting all patches.

  `encoder` is the ViT (its params are the `encoder` subtree); the decoder's
  `remat` / `scan_blocks` follow the encoder's speed options.
  """

  encoder: ViTEncoder
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  dtype: Dtype = jnp.float32

  def setup(self):
    enc = self.encoder
    self.decoder = MAEDecoder(
      self.decoder_width,
      self.decoder_depth,
      self.decoder_heads,
      enc.num_patches,
      enc.patch_size**2 * enc.in_chans,
      enc.mlp_ratio,
      dtype=self.dtype,
      remat=enc.remat,
      scan_blocks=enc.scan_blocks,
    )

  def __call__(self, images, noise, mask_ratio: float, train: bool = False) -> MAEOutput:
    """`noise` `(B, L)` U[0,1) replaces `torch.rand` of the official code."""
    tokens = self.encoder.embed_patches(images)
    masking = random_masking(noise, mask_ratio)
    visible = jnp.take_along_axis(tokens, masking.ids_keep[..., None], axis=1)
    latent = self.encoder(images, train=train, tokens=visible)
    pred = self.decoder(latent, masking.ids_restore, train=train)
    return MAEOutput(latent, pred, masking)
