"""ViT classifier for fine-tuning and linear probing (MAE `models_vit`), with
DeiT's distillation head and TinyMIM*-T's extra layer as options.

Params: `{'encoder': <ViTEncoder params>, 'fc_norm': ..., 'head': ...}` with
global average pooling (`fc_norm` after pooling, no encoder final norm, as
`models_vit` deletes `norm`), or `{'encoder', 'head'}` with CLS pooling.
An encoder with a distillation token (`dist_token=True`, tokens `[cls,
dist, patches]`) adds `head_dist` (DeiT `DistilledVisionTransformer`); the
extra layer (`extra_width > 0`) adds `conv1x1_0` / `conv1x1_1` (official
`conv1x1.0`, `conv1x1.1`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models import star_layer
from mimdistill.models.vit import ViTEncoder, layer_norm

Dtype = Any
# What `head_dist` reads under global pooling (DeiT has no global pooling;
# see `ViTClassifier`).
DIST_POOLS = ("token", "avg")


class ViTClassifier(nn.Module):
  """`encoder` (built with `final_norm=not global_pool`) and the head(s).

  Global pooling averages the patch tokens (the prefix tokens excluded).

  With a distillation token (DeiT `DistilledVisionTransformer`): a second
  Linear `head_dist` on the distillation token; in train mode the call
  returns the tuple `(cls_logits, dist_logits)`, in eval mode their average
  `(head + head_dist) / 2`. With CLS pooling (`global_pool=False`) this is
  DeiT exactly: encoder `norm`, `head(x[:, 0])`, `head_dist(x[:, 1])`.

  With global pooling, how TinyMIM*-T's two heads pooled was never
  published (its fine-tuned checkpoint had `head`, `head_dist` and one
  `fc_norm`). `dist_pool` is our choice: 'token' (default) gives
  `head_dist(fc_norm(x[:, 1]))`, the distillation token itself through the
  same `fc_norm` as the pooled patches; 'avg' gives both heads the pooled
  patches. 'token' because it keeps DeiT's point (the distillation token is
  its own output, supervised by the teacher, while the CLS head reads the
  MAE-style pool) and needs only the one `fc_norm` the released checkpoint
  has; with 'avg' the two heads would read one and the same vector.

  The extra layer (`extra_width`, TinyMIM*-T: 1280) runs on all tokens after
  the encoder (after the last block with global pooling; after the encoder
  norm with CLS pooling), so pooling, `fc_norm` and the heads are
  `extra_width` wide.
  """

  encoder: ViTEncoder
  num_classes: int
  global_pool: bool = True
  linear_probe: bool = False  # BatchNorm (no affine) before the head, MAE linprobe
  head_init_std: float = 2e-5  # linear probing uses 0.01
  dtype: Dtype = jnp.float32
  dist_pool: str = "token"
  extra_width: int = 0  # > 0: TinyMIM*-T's extra layer to this width

  @property
  def distilled(self) -> bool:
    return bool(self.encoder.dist_token)

  def setup(self):
    if self.global_pool == self.encoder.final_norm:
      raise ValueError(
        "a global-pool classifier has no encoder norm (fc_norm after pooling) and a CLS "
        f"classifier keeps it; got global_pool={self.global_pool} with "
        f"final_norm={self.encoder.final_norm}"
      )
    if self.dist_pool not in DIST_POOLS:
      raise ValueError(f"dist_pool={self.dist_pool!r} is not one of {DIST_POOLS}")
    if self.linear_probe and self.distilled:
      raise ValueError(
        "linear probing of a distillation-token model is not supported (one BatchNorm, two "
        "heads); probe with dist_token=False"
      )
    if self.extra_width:
      self.conv1x1_0, self.conv1x1_1 = star_layer.modules(self.extra_width, self.dtype)
    if self.global_pool:
      self.fc_norm = layer_norm(dtype=self.dtype)
    if self.linear_probe:
      self.bn = nn.BatchNorm(use_scale=False, use_bias=False, epsilon=1e-6, momentum=0.9)
    # MAE calls timm's trunc_normal_(std=2e-5), whose cutoff is +-2 in
    # absolute value: at this std it is a plain normal. head_dist gets the
    # same init as head (a fresh head of a fine-tuning run, DeiT's own
    # 0.02 being for training from scratch).
    init = nn.initializers.normal(self.head_init_std)
    self.head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init)
    if self.distilled:
      self.head_dist = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init)

  def tokens(self, images, *, train: bool = False):
    """All output tokens `(B, prefix + L, D or extra_width)`."""
    x = self.encoder(images, train=train)
    if self.extra_width:
      x = star_layer.apply(self.conv1x1_0, self.conv1x1_1, x)
    return x

  def features(self, images, *, train: bool = False):
    """The head input `(B, D)`, or `(cls_features, dist_features)` with a
    distillation token."""
    x = self.tokens(images, train=train)
    if not self.global_pool:
      return (x[:, 0], x[:, 1]) if self.distilled else x[:, 0]
    pooled = self.fc_norm(jnp.mean(x[:, self.encoder.num_prefix_tokens :], axis=1))
    if not self.distilled:
      return pooled
    return pooled, (self.fc_norm(x[:, 1]) if self.dist_pool == "token" else pooled)

  def __call__(self, images, *, train: bool = False):
    feats = self.features(images, train=train)
    if self.distilled:
      cls = self.head(feats[0]).astype(jnp.float32)
      dist = self.head_dist(feats[1]).astype(jnp.float32)
      return (cls, dist) if train else (cls + dist) / 2
    if self.linear_probe:
      feats = self.bn(jax.lax.stop_gradient(feats), use_running_average=not train)
    return self.head(feats).astype(jnp.float32)
