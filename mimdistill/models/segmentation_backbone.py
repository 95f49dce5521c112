"""TinyMIM's segmentation backbone (`Segmentation/TinyMIM/backbone/mae.py`,
class `MAE`, and the TinyMIM*-T variant of `Segmentation/TinyMIMstar-T`).

A BEiT-style ViT (`ViTEncoder` as `encoder`, built from the model section
by `models.factory.segmentor`: relative position bias per block, layer
scale `gamma_1`/`gamma_2`, learned absolute position embedding, drop-path
ramp, no final norm) whose token sequences after the 0-based
blocks `out_indices` (CLS, and the distillation token, dropped) become
`(B, H/p, W/p, D)` maps; the k-th map goes through neck `fpn<k+1>`:

  neck 'tinymim', patch 16 (strides 4/8/16/32):
    fpn1 = ConvT(D, D, 2, 2) -> BatchNorm -> GELU -> ConvT(D, D, 2, 2)
           (`fpn1_0`, `fpn1_1`, `fpn1_3`), fpn2 = ConvT(D, D, 2, 2)
           (`fpn2_0`), fpn3 = identity, fpn4 = max-pool 2x2;
  patch 8: fpn1 = ConvT(D, D, 2, 2), fpn2 = identity, fpn3 = max-pool 2,
           fpn4 = max-pool 4;
  patch 4 (mimdistill's, for the quickstart's patch-4 students; the
           official module has no necks for it): fpn1 = identity, fpn2 =
           max-pool 2, fpn3 = max-pool 4, fpn4 = max-pool 8 (strides 4/8/16/32
           as for the other patch sizes, no new weights);
  neck 'tinymim_star' (TinyMIM*-T): tokens `[cls, dist, patches]`, 6 extra
    relative-position rows, and after block 11 the extra layer `conv1x1` =
    LayerNorm(eps 1e-5) -> Linear(D, fc_dim) -> GELU on all tokens (the
    official `if i == 11`); patch 16: fpn1 = ConvT(D, 2D) -> BN(2D) -> GELU
    -> ConvT(2D, 4D), fpn2 = ConvT(D, 4D), fpn3 = Conv2d(D, 4D, 1), fpn4 =
    Conv2d(fc_dim, 4D, 3, stride 2, padding 1); patch 8 as 'tinymim' (the
    last map keeps fc_dim channels).

The neck BatchNorm is the file's default `nn.SyncBatchNorm` (eps 1e-5,
momentum 0.1): torch semantics, over the global batch under jit
(`models.torch_batch_norm`). GELU is exact. Params: `encoder/...` (the
ViTEncoder tree, so a distilled or fine-tuned encoder drops in), `fpn*`,
`conv1x1_*`; batch statistics in `batch_stats`.

Choices where the official code is silent or breaks: only square crops (the
ViT's patch grid is square; the official relative-position loader refuses
non-square grids too); patch sizes other than 4, 8 and 16 raise (the
official module has no necks for them; patch 4 is the parameter-free
extension above); the star neck needs depth 12 with 11 the last
out index (its extra layer is hard-coded after block index 11, and a block
after it would receive fc_dim-wide tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models import star_layer
from mimdistill.models.conv_layers import ConvTranspose, torch_conv
from mimdistill.models.torch_batch_norm import BatchNorm
from mimdistill.models.vit import ViTEncoder

Dtype = Any
NECKS = ("tinymim", "tinymim_star")
PATCH_SIZES = (4, 8, 16)
STAR_EXTRA_BLOCK = 11  # the official `if i == 11`


def check_backbone(
  *, neck: str, patch_size: int, image_size: int, depth: int, out_indices: Sequence[int]
) -> None:
  """The backbone's one-line errors, from its sizes alone (a stage's
  `validate` calls it before anything is built)."""
  if neck not in NECKS:
    raise ValueError(f"unknown segmentation neck {neck!r}; use one of {NECKS}")
  if patch_size not in PATCH_SIZES:
    raise ValueError(
      f"patch_size={patch_size}: the segmentation necks exist for patch sizes {PATCH_SIZES} "
      "only (TinyMIM's for 8 and 16)"
    )
  if neck == "tinymim_star" and patch_size == 4:
    raise ValueError("the TinyMIM*-T neck exists for patch sizes 8 and 16 only")
  if image_size % patch_size:
    raise ValueError(
      f"crop size {image_size} is not a multiple of the patch size {patch_size}; "
      f"use e.g. {image_size // patch_size * patch_size or patch_size}"
    )
  idx = [int(i) for i in out_indices]
  if idx and idx[-1] >= depth:
    raise ValueError(
      f"out_indices={idx}: block index {idx[-1]} is beyond the backbone's depth {depth} "
      f"(0-based indices 0..{depth - 1}); set out_indices within the depth"
    )
  if len(idx) != 4 or idx != sorted(set(idx)) or idx[0] < 0:
    raise ValueError(
      f"out_indices={idx} must be 4 ascending, distinct block indices in 0..{depth - 1} "
      f"(0-based) for a backbone of depth {depth}"
    )
  if neck == "tinymim_star" and (depth != 12 or idx[-1] != STAR_EXTRA_BLOCK):
    raise ValueError(
      f"the TinyMIM*-T backbone applies its extra layer after block index "
      f"{STAR_EXTRA_BLOCK} (hard-coded in the official code): it needs depth 12 and "
      f"out_indices ending in 11, got depth {depth} and out_indices {idx}"
    )


def _gelu(x):
  return nn.gelu(x, approximate=False)


def _max_pool(x, k: int):
  return nn.max_pool(x, (k, k), strides=(k, k), padding="VALID")


class SegmentationBackbone(nn.Module):
  """`encoder` (a `ViTEncoder` built by `models.factory`: no final norm,
  `dist_token` for the star neck) and the necks."""

  encoder: ViTEncoder
  out_indices: Sequence[int] = (3, 5, 7, 11)
  neck: str = "tinymim"
  fc_dim: int = 1280  # width of TinyMIM*-T's extra layer
  dtype: Dtype = jnp.float32

  @property
  def star(self) -> bool:
    return self.neck == "tinymim_star"

  @property
  def width(self) -> int:
    return self.encoder.width

  @property
  def depth(self) -> int:
    return self.encoder.depth

  @property
  def patch_size(self) -> int:
    return self.encoder.patch_size

  @property
  def image_size(self) -> int:
    return self.encoder.image_size

  @property
  def in_chans(self) -> int:
    return self.encoder.in_chans

  @property
  def num_prefix_tokens(self) -> int:
    return self.encoder.num_prefix_tokens

  @property
  def grid_size(self) -> int:
    return self.encoder.grid_size

  def out_channels(self) -> list[int]:
    """Channels of the four maps (the heads' `in_channels`)."""
    d = self.width
    if self.star and self.patch_size == 16:
      return [4 * d] * 4
    if self.star:
      return [d, d, d, self.fc_dim]
    return [d] * 4

  def validate(self) -> None:
    check_backbone(
      neck=self.neck,
      patch_size=self.patch_size,
      image_size=self.image_size,
      depth=self.depth,
      out_indices=self.out_indices,
    )
    if self.encoder.final_norm:
      raise ValueError(
        "the segmentation backbone takes raw block outputs: build its encoder with final_norm=False"
      )
    if self.encoder.dist_token != self.star:
      raise ValueError(
        f"neck {self.neck!r} needs an encoder with dist_token={self.star} (tokens "
        f"{'[cls, dist, patches]' if self.star else '[cls, patches]'})"
      )

  def setup(self):
    self.validate()
    d, dt = self.width, self.dtype
    if self.star:
      self.conv1x1_0, self.conv1x1_1 = star_layer.modules(self.fc_dim, dt)
    if self.patch_size == 16:
      mid, out = (2 * d, 4 * d) if self.star else (d, d)
      self.fpn1_0 = ConvTranspose(mid, dtype=dt)
      self.fpn1_1 = BatchNorm(dtype=dt)
      self.fpn1_3 = ConvTranspose(out, dtype=dt)
      self.fpn2_0 = ConvTranspose(out, dtype=dt)
      if self.star:
        self.fpn3 = torch_conv(out, 1, d, dtype=dt)
        self.fpn4_0 = torch_conv(out, 3, self.fc_dim, stride=2, padding=1, dtype=dt)
    elif self.patch_size == 8:
      self.fpn1_0 = ConvTranspose(d, dtype=dt)

  def extra_layer(self, tokens):
    """TinyMIM*-T's `conv1x1`: LayerNorm(1e-5) -> Linear -> exact GELU."""
    return star_layer.apply(self.conv1x1_0, self.conv1x1_1, tokens)

  def necks(self, maps: Sequence[jax.Array], train: bool) -> list[jax.Array]:
    x0, x1, x2, x3 = maps
    if self.patch_size == 16:
      y0 = self.fpn1_3(_gelu(self.fpn1_1(self.fpn1_0(x0), train)))
      y1 = self.fpn2_0(x1)
      if self.star:
        return [y0, y1, self.fpn3(x2), self.fpn4_0(x3)]
      return [y0, y1, x2, _max_pool(x3, 2)]
    if self.patch_size == 8:
      return [self.fpn1_0(x0), x1, _max_pool(x2, 2), _max_pool(x3, 4)]
    return [x0, _max_pool(x1, 2), _max_pool(x2, 4), _max_pool(x3, 8)]

  def intermediates(self, images, *, train: bool = False) -> dict[str, Any]:
    """Everything the parity fixtures record: `tokens_in` (input of block
    0), `neck_in` (the four maps), `features` (the neck outputs) and, for
    the star backbone, `conv1x1_in` / `conv1x1_out` (all tokens)."""
    enc = self.encoder
    tokens_in = enc.prepend_prefix(enc.embed_patches(images))
    outs, done = [], 0
    x = tokens_in
    result: dict[str, Any] = {"tokens_in": tokens_in}
    for index in self.out_indices:
      x = enc.run_blocks(x, int(index) + 1, train, start=done)
      done = int(index) + 1
      if self.star and index == STAR_EXTRA_BLOCK:
        result["conv1x1_in"] = x
        x = self.extra_layer(x)
        result["conv1x1_out"] = x
      outs.append(x)
    b, g = images.shape[0], self.grid_size
    p = self.num_prefix_tokens
    maps = [o[:, p:].reshape(b, g, g, o.shape[-1]) for o in outs]
    result["neck_in"] = maps
    result["features"] = self.necks(maps, train)
    return result

  def __call__(self, images, *, train: bool = False) -> list[jax.Array]:
    """The four NHWC feature maps at strides 4, 8, 16, 32 (patch 16)."""
    return self.intermediates(images, train=train)["features"]
