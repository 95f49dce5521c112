"""UPerNet decode head (mmseg `UPerHead` with its `PPM`), as mmseg 0.11 /
mmcv 1.3 compute it.

    inputs[in_index] = [x0, x1, x2, x3]  (strides 4, 8, 16, 32)
    psp = bottleneck(cat[x3, up(ppm_s(x3)) for s in pool_scales])
    laterals = [lateral_convs_i(x_i) for i < 3] + [psp]
    top-down: laterals[i-1] += resize(laterals[i], laterals[i-1] size)
    fpn = [fpn_convs_i(laterals[i]) for i < 3] + [laterals[3]]
    out = conv_seg(dropout(fpn_bottleneck(cat[resize(f, fpn[0] size)])))

`ppm_s` = AdaptiveAvgPool2d(s) -> ConvModule 1x1 (`psp_modules_<i>_1`);
every resize is bilinear with align_corners=False (`models.resize`); the
ConvModules are conv + BatchNorm + ReLU; `dropout` is `nn.Dropout2d` (whole
channels per sample, rng collection 'dropout'); `conv_seg` is a 1x1 conv
with bias, init N(0, 0.01) / 0 (`BaseDecodeHead.init_weights`).
NHWC in and out; the logits are at the resolution of `inputs[in_index[0]]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimdistill.models.conv_layers import ConvModule
from mimdistill.models.resize import adaptive_avg_pool, resize_bilinear

Dtype = Any


def conv_seg(num_classes: int, dtype: Dtype) -> nn.Conv:
  return nn.Conv(
    num_classes,
    (1, 1),
    kernel_init=nn.initializers.normal(0.01),
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    name="conv_seg",
  )


def channel_dropout(rate: float) -> nn.Dropout:
  """`nn.Dropout2d(rate)` on NHWC: one draw per (sample, channel)."""
  return nn.Dropout(rate, broadcast_dims=(1, 2), name="dropout")


class UPerHead(nn.Module):
  num_classes: int
  channels: int = 768
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  in_index: Sequence[int] = (0, 1, 2, 3)
  dropout_ratio: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence, *, train: bool = False):
    xs = [inputs[i] for i in self.in_index]
    c = self.channels
    top = xs[-1]
    psp = [top]
    for i, s in enumerate(self.pool_scales):
      pooled = adaptive_avg_pool(top, s)
      y = ConvModule(c, 1, dtype=self.dtype, name=f"psp_modules_{i}_1")(pooled, train)
      psp.append(resize_bilinear(y, top.shape[1:3]))
    psp_out = ConvModule(c, 3, padding=1, dtype=self.dtype, name="bottleneck")(
      jnp.concatenate(psp, axis=-1), train
    )
    laterals = [
      ConvModule(c, 1, dtype=self.dtype, name=f"lateral_convs_{i}")(x, train)
      for i, x in enumerate(xs[:-1])
    ]
    laterals.append(psp_out)
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [
      ConvModule(c, 3, padding=1, dtype=self.dtype, name=f"fpn_convs_{i}")(laterals[i], train)
      for i in range(len(laterals) - 1)
    ]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [resize_bilinear(o, size) for o in outs[1:]]
    y = ConvModule(c, 3, padding=1, dtype=self.dtype, name="fpn_bottleneck")(
      jnp.concatenate(outs, axis=-1), train
    )
    if self.dropout_ratio > 0:
      y = channel_dropout(self.dropout_ratio)(y, deterministic=not train)
    return conv_seg(self.num_classes, self.dtype)(y)
