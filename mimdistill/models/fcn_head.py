"""mmseg `FCNHead`, the auxiliary head of TinyMIM's UperNet: `num_convs`
ConvModules (`convs_<i>`, kernel 3, padding `k // 2 * dilation`), optionally
`conv_cat` over [input, convs output] (`concat_input`), then dropout
(`nn.Dropout2d`) and `conv_seg`, on `inputs[in_index]`. NHWC in and out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimdistill.models.conv_layers import ConvModule
from mimdistill.models.uper_head import channel_dropout, conv_seg

Dtype = Any


class FCNHead(nn.Module):
  num_classes: int
  channels: int = 256
  in_index: int = 2
  num_convs: int = 1
  kernel_size: int = 3
  dilation: int = 1
  concat_input: bool = False
  dropout_ratio: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence, *, train: bool = False):
    x = inputs[self.in_index]
    if self.num_convs == 0 and x.shape[-1] != self.channels:
      raise ValueError(
        f"FCNHead with num_convs=0 needs in_channels == channels, got {x.shape[-1]} and "
        f"{self.channels}"
      )
    pad = self.kernel_size // 2 * self.dilation
    y = x
    for i in range(self.num_convs):
      y = ConvModule(
        self.channels,
        self.kernel_size,
        padding=pad,
        dilation=self.dilation,
        dtype=self.dtype,
        name=f"convs_{i}",
      )(y, train)
    if self.concat_input:
      y = ConvModule(
        self.channels,
        self.kernel_size,
        padding=self.kernel_size // 2,
        dtype=self.dtype,
        name="conv_cat",
      )(jnp.concatenate([x, y], axis=-1), train)
    if self.dropout_ratio > 0:
      y = channel_dropout(self.dropout_ratio)(y, deterministic=not train)
    return conv_seg(self.num_classes, self.dtype)(y)
