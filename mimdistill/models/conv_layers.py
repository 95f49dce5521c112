"""Convolution layers of the segmentation models, with mmcv / PyTorch
initialisation and the official parameter names.

  * `ConvModule`: mmcv's `ConvModule(conv -> norm -> act)` as mmseg builds it
    with `norm_cfg=BN`: a bias-free conv (`bias='auto'` drops it before a
    norm), torch-semantics BatchNorm (`bn`), ReLU; conv init kaiming-normal
    (fan_out, relu), norm 1/0 (`ConvModule.init_weights`).
  * `ConvTranspose`: `nn.ConvTranspose2d(k, stride=k)` (the necks' 2x2 stride
    2 upsampling). Kernel == stride makes the output blocks disjoint, so it
    is one einsum: `out[k*i + a, k*j + b] = x[i, j] @ W[a, b] + bias`. Flax
    kernel `(k, k, in, out)`; torch's weight is `(in, out, k, k)`.
    PyTorch default init: U(+-1/sqrt(fan_in)) for weight and bias, where
    torch's fan_in of a transposed conv weight is `out * k * k`.
  * `torch_conv`: `nn.Conv2d` with PyTorch's default init (a plain conv the
    official backbone does not re-initialise).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models.torch_batch_norm import BatchNorm

Dtype = Any

# mmcv kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default init of conv
  weights (kaiming_uniform with a=sqrt(5)) and biases."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_conv(
  features: int,
  kernel: int,
  in_features: int,
  *,
  stride: int = 1,
  padding: int = 0,
  name: str | None = None,
  dtype: Dtype = jnp.float32,
) -> nn.Conv:
  fan_in = in_features * kernel * kernel
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((padding, padding), (padding, padding)),
    kernel_init=torch_uniform(fan_in),
    bias_init=torch_uniform(fan_in),
    dtype=dtype,
    name=name,
  )


class ConvModule(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU; params `conv/kernel`, `bn/{scale,
  bias}`, stats `bn/running_*` (mmcv names `conv.weight`, `bn.weight`, ...)."""

  features: int
  kernel: int = 1
  padding: int = 0
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    p = self.padding
    x = nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      padding=((p, p), (p, p)),
      kernel_dilation=(self.dilation, self.dilation),
      use_bias=False,
      kernel_init=kaiming_fan_out,
      dtype=self.dtype,
      name="conv",
    )(x)
    x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.relu(x)


class ConvTranspose(nn.Module):
  """`nn.ConvTranspose2d(in, features, kernel_size=k, stride=k)`."""

  features: int
  kernel: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel
    fan_in = self.features * k * k  # torch's fan_in of a (in, out, k, k) weight
    kernel = self.param("kernel", torch_uniform(fan_in), (k, k, x.shape[-1], self.features))
    bias = self.param("bias", torch_uniform(fan_in), (self.features,))
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwc,ijco->bhiwjo", x.astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(b, h * k, w * k, self.features)
    return y + bias.astype(self.dtype)
