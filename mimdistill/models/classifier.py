"""ViT classifier for fine-tuning and linear probing (MAE `models_vit`).

Params: `{'encoder': <ViTEncoder params>, 'fc_norm': ..., 'head': ...}` with
global average pooling (`fc_norm` after pooling, no encoder final norm, as
`models_vit` deletes `norm`), or `{'encoder', 'head'}` with CLS pooling.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models.vit import ViTEncoder, layer_norm

Dtype = Any


class ViTClassifier(nn.Module):
  """`encoder` (built with `final_norm=not global_pool`) and the head.

  Global pooling averages the patch tokens (the prefix tokens excluded).
  """

  encoder: ViTEncoder
  num_classes: int
  global_pool: bool = True
  linear_probe: bool = False  # BatchNorm (no affine) before the head, MAE linprobe
  head_init_std: float = 2e-5  # linear probing uses 0.01
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.global_pool == self.encoder.final_norm:
      raise ValueError(
        "a global-pool classifier has no encoder norm (fc_norm after pooling) and a CLS "
        f"classifier keeps it; got global_pool={self.global_pool} with "
        f"final_norm={self.encoder.final_norm}"
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
      return self.fc_norm(jnp.mean(x[:, self.encoder.num_prefix_tokens :], axis=1))
    return x[:, 0]

  def __call__(self, images, *, train: bool = False):
    feats = self.features(images, train=train)
    if self.linear_probe:
      feats = self.bn(jax.lax.stop_gradient(feats), use_running_average=not train)
    return self.head(feats).astype(jnp.float32)
