"""ViT classifier for fine-tuning and linear probing (MAE `models_vit`).

Params: `{'encoder': <ViTEncoder params>, 'fc_norm': ..., 'head': ...}` with
global average pooling (`fc_norm` after pooling, no encoder final norm, as
`models_vit` deletes `norm`), or `{'encoder', 'head'}` with CLS pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models.vit import ViTEncoder, layer_norm

Dtype = Any


class ViTClassifier(nn.Module):
  width: int
  depth: int
  num_heads: int
  num_classes: int
  patch_size: int = 16
  image_size: int = 224
  in_chans: int = 3
  mlp_ratio: float = 4.0
  drop_path: Sequence[float] | float = 0.0
  global_pool: bool = True
  pos_embed_type: str = "learned"
  linear_probe: bool = False  # BatchNorm (no affine) before the head, MAE linprobe
  head_init_std: float = 2e-5  # linear probing uses 0.01
  dtype: Dtype = jnp.float32
  fused_attention: bool = False
  remat: bool = False  # jax.checkpoint per encoder block
  scan_blocks: bool = False  # lax.scan over the encoder blocks

  def setup(self):
    self.encoder = ViTEncoder(
      self.width,
      self.depth,
      self.num_heads,
      self.patch_size,
      self.image_size,
      self.in_chans,
      self.mlp_ratio,
      self.drop_path,
      pos_embed_type=self.pos_embed_type,
      final_norm=not self.global_pool,
      dtype=self.dtype,
      fused_attention=self.fused_attention,
      remat=self.remat,
      scan_blocks=self.scan_blocks,
    )
    if self.global_pool:
      self.fc_norm = layer_norm(dtype=self.dtype)
    if self.linear_probe:
      self.bn = nn.BatchNorm(use_scale=False, use_bias=False, epsilon=1e-6, momentum=0.9)
    # MAE calls timm's trunc_normal_(std=2e-5), whose cutoff is +-2 in
    # absolute value: at this std it is a plain normal.
    self.head = nn.Dense(
      self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(self.head_init_std)
    )

  def features(self, images, *, train: bool = False):
    x = self.encoder(images, train=train)
    if self.global_pool:
      return self.fc_norm(jnp.mean(x[:, 1:], axis=1))
    return x[:, 0]

  def __call__(self, images, *, train: bool = False):
    feats = self.features(images, train=train)
    if self.linear_probe:
      feats = self.bn(jax.lax.stop_gradient(feats), use_running_average=not train)
    return self.head(feats).astype(jnp.float32)
