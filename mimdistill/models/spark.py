"""SparK masked-CNN pre-training model (keyu-tian/SparK `pretrain/spark.py`,
`pretrain/decoder.py`): sparse encoder, densify, LightDecoder.

Forward (`SparK.forward` up to the loss, which is `objectives/spark_loss.py`):
  1. the encoder (a `ResNet` or `ConvNeXt`, sparse) runs on the image times
     the mask and returns its four stage outputs, reversed here so that level
     0 is stride 32;
  2. densify, per level i: `densify_norms_i` (sparse BN for 'bn', sparse
     LayerNorm for 'ln', nothing for ''), the learned `mask_tokens_i` where
     the cell is masked, `densify_projs_i`: a dense conv 1x1 at level 0 (none
     if the encoder width already equals the decoder width) and 3x3 pad 1
     after, to decoder width `width // 2**i`;
  3. the LightDecoder: 5 UNet blocks, `up_sample` ConvTranspose k4 s2 p1 ->
     conv3x3 -> BN -> ReLU6 -> conv3x3 -> BN, the densified level i added
     before block i (i < 4); `proj` 1x1 to 3 channels.

`decoder_blocks=k < 5` (not SparK's: for a student read at the output of
decoder block k, see `models/hetero.py`) runs only the first k blocks and
densifies only the levels they read (max(k, 1) of them); there is then no
`proj` and no reconstruction (`rec` is None), so no parameter exists that
the loss could not reach.

Params (SparK's names with '.<n>' as '_<n>'): `encoder` (the CNN's own
tree; SparK's `sparse_encoder.sp_cnn`), `densify_norms_<i>`,
`densify_projs_<i>`, `mask_tokens_<i>` `(1, 1, 1, C)`, `dense_decoder/
{dec_<i>/{up_sample, conv_0, conv_1, conv_3, conv_4}, proj}`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models import sparse
from mimdistill.models.vit import torch_default_bias_init

Dtype = Any
DENSIFY_NORMS = ("bn", "ln", "")

# LightDecoder.initialize: trunc_normal_(std=.02) (a plain normal: timm's
# bounds are +-2 absolute) for Conv2d, zero bias; ConvTranspose2d is not a
# Conv2d subclass in torch and gets kaiming-normal (fan_out, relu).
decoder_conv_init = nn.initializers.normal(0.02)
up_sample_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# SparK never re-initialises the densify projections: torch's Conv2d default.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# `trunc_normal_(p, std=.02, a=-.02, b=.02)`: cut at one standard deviation.
mask_token_init = nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)


class SparKOutput(NamedTuple):
  features: tuple[jax.Array, ...]  # encoder outputs, stride 4 .. 32 (SparseEncoder order)
  normed: tuple[jax.Array, ...]  # densify level i (0 = stride 32) after its norm
  filled: tuple[jax.Array, ...]  # ... with mask tokens at masked positions
  to_dec: tuple[jax.Array, ...]  # ... after the projection, fed to the decoder
  decoder_blocks: tuple[jax.Array, ...]  # output of each UNet block
  rec: jax.Array | None  # (B, H, W, 3) reconstruction of the normalised patches


class ConvTranspose(nn.Module):
  """torch `ConvTranspose2d(k, stride s, padding p)` on NHWC. `kernel` is
  `(kh, kw, in, out)`: torch's `(in, out, kh, kw)` transposed (2, 3, 0, 1).
  Computed as the correlation of the s-dilated input, padded by k - 1 - p,
  with the spatially flipped kernel (the adjoint of torch's conv)."""

  features: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  kernel_init: Any = up_sample_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    pad = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel[::-1, ::-1].astype(self.dtype),
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      lhs_dilation=(self.stride, self.stride),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + bias.astype(y.dtype)


def _conv3x3(features: int, name: str, dtype: Dtype) -> nn.Conv:
  return nn.Conv(
    features,
    (3, 3),
    padding=((1, 1), (1, 1)),
    use_bias=False,
    kernel_init=decoder_conv_init,
    dtype=dtype,
    name=name,
  )


class UNetBlock(nn.Module):
  """SparK `UNetBlock`: 2x up-sampling, then conv-BN-ReLU6-conv-BN (dense)."""

  cin: int
  cout: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvTranspose(self.cin, dtype=self.dtype, name="up_sample")(x)
    x = _conv3x3(self.cin, "conv_0", self.dtype)(x)
    x = sparse.BatchNorm(dtype=self.dtype, name="conv_1")(x, None, train)
    x = jnp.clip(x, 0.0, 6.0)
    x = _conv3x3(self.cout, "conv_3", self.dtype)(x)
    return sparse.BatchNorm(dtype=self.dtype, name="conv_4")(x, None, train)


def decoder_channels(width: int, up_sample_ratio: int = sparse.DOWNSAMPLE_RATIO) -> list[int]:
  """`[width // 2**i for i in 0..log2(ratio)]` (LightDecoder's halving rule)."""
  n = round(math.log2(up_sample_ratio))
  if 2**n != up_sample_ratio:
    raise ValueError(f"up_sample_ratio must be a power of 2, got {up_sample_ratio}")
  channels = [width // 2**i for i in range(n + 1)]
  if channels[-1] < 1:
    raise ValueError(f"decoder width {width} is too small to halve {n} times; use >= {2**n}")
  return channels


class LightDecoder(nn.Module):
  """SparK `LightDecoder(up_sample_ratio=32, width)`; `num_blocks` < all
  stops after that many blocks, without `proj` (rec None)."""

  width: int = 768
  up_sample_ratio: int = sparse.DOWNSAMPLE_RATIO
  num_blocks: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, to_dec, train: bool = False):
    channels = decoder_channels(self.width, self.up_sample_ratio)
    pairs = list(zip(channels[:-1], channels[1:]))
    run = len(pairs) if self.num_blocks is None else self.num_blocks
    if not 0 <= run <= len(pairs):
      raise ValueError(f"num_blocks={self.num_blocks} is outside 0..{len(pairs)}")
    x = 0.0
    blocks = []
    for i, (cin, cout) in enumerate(pairs[:run]):
      if i < len(to_dec) and to_dec[i] is not None:
        x = x + to_dec[i]
      x = UNetBlock(cin, cout, dtype=self.dtype, name=f"dec_{i}")(x, train)
      blocks.append(x)
    if run < len(pairs):
      return None, tuple(blocks)
    rec = nn.Conv(3, (1, 1), kernel_init=decoder_conv_init, dtype=self.dtype, name="proj")(
      x
    ).astype(jnp.float32)
    return rec, tuple(blocks)


class SparK(nn.Module):
  """SparK (see the module docstring). `encoder` is a `ResNet` / `ConvNeXt`
  without classifier; `active` the bool `(B, f, f)` mask (True = visible).
  `densify_norm`: SparK uses 'bn' for ResNets and 'ln' for ConvNeXts."""

  encoder: nn.Module
  decoder_width: int = 768
  densify_norm: str = "bn"
  decoder_blocks: int | None = None  # see the module docstring
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, active, train: bool = False) -> SparKOutput:
    if self.densify_norm not in DENSIFY_NORMS:
      raise ValueError(f"densify_norm must be one of {DENSIFY_NORMS}, got {self.densify_norm!r}")
    for size in images.shape[1:3]:
      sparse.grid_size(size)
    features = tuple(self.encoder(images, active, train).features)
    normed, filled, to_dec = [], [], []
    d_width = self.decoder_width
    levels = len(features) if self.decoder_blocks is None else max(self.decoder_blocks, 1)
    for i, feat in enumerate(list(reversed(features))[:levels]):
      e_width = feat.shape[-1]
      if self.densify_norm == "bn":
        y = sparse.BatchNorm(dtype=self.dtype, name=f"densify_norms_{i}")(feat, active, train)
      elif self.densify_norm == "ln":
        y = sparse.masked(sparse.layer_norm(f"densify_norms_{i}", self.dtype)(feat), active)
      else:
        y = feat
      normed.append(y)
      token = self.param(f"mask_tokens_{i}", mask_token_init, (1, 1, 1, e_width), jnp.float32)
      visible = sparse.mask_at(active, y.shape[1], y.shape[2], jnp.bool_)
      y = jnp.where(visible, y, token.astype(y.dtype))
      filled.append(y)
      if not (i == 0 and e_width == d_width):
        k = 1 if i == 0 else 3
        fan_in = e_width * k * k
        y = nn.Conv(
          d_width,
          (k, k),
          padding=((k // 2, k // 2), (k // 2, k // 2)),
          kernel_init=torch_conv_init,
          bias_init=torch_default_bias_init(fan_in),
          dtype=self.dtype,
          name=f"densify_projs_{i}",
        )(y)
      to_dec.append(y)
      d_width //= 2
    rec, blocks = LightDecoder(
      self.decoder_width, num_blocks=self.decoder_blocks, dtype=self.dtype, name="dense_decoder"
    )(to_dec, train)
    return SparKOutput(features, tuple(normed), tuple(filled), tuple(to_dec), blocks, rec)
