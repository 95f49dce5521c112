"""Stage 1's picture: MAE reconstructions of a few eval images."""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.data.transforms import denormalize
from mimdistill.models.mae import MAE, patchify, unpatchify
from mimdistill.visualize import write_png_bytes


def save_reconstructions(
  model: MAE,
  variables,
  images: np.ndarray,
  path: str | os.PathLike,
  *,
  mask_ratio: float,
  norm_pix_loss: bool,
  seed: int = 0,
):
  """PNG grid: rows of (original, masked input, reconstruction, reconstruction
  with visible patches pasted back), as in the MAE paper's figures. With
  `norm_pix_loss` the prediction is un-normalised with the true patch
  statistics so that it is comparable with the input."""
  from PIL import Image

  enc = model.encoder
  p, chans = enc.patch_size, enc.in_chans
  imgs = jnp.asarray(images)
  noise = jax.random.uniform(jax.random.PRNGKey(seed), (imgs.shape[0], enc.num_patches))
  out = jax.jit(lambda v, x, n: model.apply(v, x, n, mask_ratio))(variables, imgs, noise)
  pred = out.pred
  if norm_pix_loss:
    target = patchify(imgs, p)
    mean = target.mean(-1, keepdims=True)
    std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  mask = out.masking.mask[..., None]
  recon = unpatchify(pred, p, chans)
  masked = unpatchify(patchify(imgs, p) * (1 - mask), p, chans)
  pasted = unpatchify(patchify(imgs, p) * (1 - mask) + pred * mask, p, chans)
  rows = []
  for i in range(imgs.shape[0]):
    tiles = [
      np.clip(denormalize(np.asarray(a[i])) * 255, 0, 255).astype(np.uint8)
      for a in (imgs, masked, recon, pasted)
    ]
    rows.append(np.concatenate(tiles, axis=1))
  grid = np.concatenate(rows, axis=0)
  scale = max(1, 256 // grid.shape[1] * 2)
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  buffer = io.BytesIO()
  img.save(buffer, format="PNG")
  return write_png_bytes(buffer.getvalue(), path)
