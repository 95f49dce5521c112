"""The TinyMIM student: a ViT encoder whose last block gives the relations,
plus the trainable heads some ablation targets need.

Params: `{'encoder': <ViTEncoder params>, 'heads'?: {'proj'?, 'decoder'?}}`.
The `encoder` subtree is exactly a ViT encoder's params, so the next link of
a sequential distillation (or fine-tuning) restores it by name.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimdistill.models.mae import MAEDecoder
from mimdistill.models.vit import ViTEncoder, dense_init


class DistillHeads(nn.Module):
  """Trainable heads of the ablation targets (params key `heads`)."""

  proj_width: int = 0  # > 0: Linear(student width -> this)
  decoder_spec: tuple | None = None  # (width, depth, heads) of an MAE decoder
  num_patches: int = 0
  out_dim: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    if self.proj_width:
      self.proj = nn.Dense(self.proj_width, dtype=self.dtype, kernel_init=dense_init)
    if self.decoder_spec:
      width, depth, heads = self.decoder_spec
      self.decoder = MAEDecoder(
        width, depth, heads, self.num_patches, self.out_dim, dtype=self.dtype
      )


class DistillStudent(nn.Module):
  """The student encoder (params `encoder`) and its heads (params `heads`)."""

  encoder: ViTEncoder
  heads: DistillHeads | None = None

  def __call__(
    self,
    images,
    *,
    train: bool = False,
    ids_keep=None,
    ids_restore=None,
    relation_heads: int = 0,
    feature: str | None = None,
    cls: bool = False,
    reconstruct: bool = False,
  ) -> dict:
    """Student outputs; only what is asked for is computed.

    relation_heads=R: q, k, v `(B, R, N, D/R)` of the last block's norm1+qkv;
    feature: a feature type of the last block, projected to the teacher width;
    cls: the output CLS token, projected; reconstruct: MAE pixel predictions.
    """
    enc = self.encoder
    tokens = enc.embed_patches(images)
    if ids_keep is not None:
      tokens = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
    x = enc.run_blocks(enc.prepend_prefix(tokens), enc.depth - 1, train)
    last = enc.blocks[enc.depth - 1]
    out = {}
    if relation_heads:
      out["qkv"] = last.relation_qkv(x, relation_heads)
    if feature not in (None, "output"):
      out["feature"] = self.heads.proj(last.features(x)[feature])
    if cls or feature == "output" or reconstruct:
      y = last(x, train=train)
      if enc.final_norm:
        y = enc.norm(y)
      if cls:
        out["cls"] = self.heads.proj(y[:, 0])
      if feature == "output":
        out["feature"] = self.heads.proj(y)
      if reconstruct:
        # MAE's decoder knows one prefix token (CLS): a distillation token
        # is left out of the reconstruction.
        if enc.dist_token:
          y = jnp.concatenate([y[:, :1], y[:, 2:]], axis=1)
        out["pred"] = self.heads.decoder(y, ids_restore, train=train)
    return out

  def init_all(self, images):
    """Touches every parameter (the unused last-block ones included: the
    student stays a complete ViT for fine-tuning)."""
    b = images.shape[0]
    ids_restore = jnp.broadcast_to(
      jnp.arange(self.encoder.num_patches), (b, self.encoder.num_patches)
    )
    y = self.encoder(images)
    if self.encoder.dist_token:
      y = jnp.concatenate([y[:, :1], y[:, 2:]], axis=1)  # see `__call__`'s reconstruct
    if self.heads is not None:
      if self.heads.proj_width:
        self.heads.proj(y)
      if self.heads.decoder_spec:
        self.heads.decoder(y, ids_restore)
    return y
