"""ConvNeXt with the official structure and names (facebookresearch/ConvNeXt
`models/convnext.py`, the copy SparK fine-tunes in
`downstream_imagenet/models/convnext_official.py`), dense or SparK-sparse
(SparK `pretrain/models/convnext.py` + `SparseConvNeXtBlock`).

Structure: `downsample_layers.0` = stem conv 4x4 stride 4 + LayerNorm
(channels_first); `downsample_layers.1..3` = LayerNorm + conv 2x2 stride 2;
`stages.<i>.<j>` blocks: depthwise conv 7x7 pad 3 -> LayerNorm -> Linear
4C (`pwconv1`) -> exact GELU -> Linear C (`pwconv2`) -> layer scale `gamma`
-> drop path (linear ramp `linspace(0, rate, sum(depths))`) -> + input.
Classifier (`num_classes > 0`): global average pool -> `norm` -> `head`.

Sparse mode: every conv output (stem, downsample, dwconv) is masked, every
LayerNorm is per position times the mask, the block's branch is masked
before the residual add (see `models/sparse.py`).

timm's ConvNeXt (other names, see `interop/cnn_names.convnext_from_timm`)
computes the same, except that timm 0.5.4's `LayerNorm2d` uses the UNBIASED
variance (`torch.var_mean`) whenever its input is not contiguous, which is
the case for the downsample norms after a stage: its logits differ from the
official model's by ~5e-4 on the same weights. We follow the official code
(and later timm, which fixed it); with that one norm patched, timm 0.5.4's
convnext_tiny and this model agree to 2e-6.

Params: `downsample_layers_<i>_<j>`, `stages_<i>_<j>/{dwconv, norm,
pwconv1, pwconv2, gamma}`, `norm`, `head` (torch names with '.<n>' as
'_<n>', see `interop/cnn_names.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mimdistill.models import sparse
from mimdistill.models.resnet import CNNOutput

Dtype = Any

# Official `convnext_<variant>`: (depths, dims).
VARIANTS = {
  "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
  "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
  "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
  "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
  "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
# Official `_init_weights`: trunc_normal_(std=.02) (timm's bounds are +-2
# absolute, i.e. +-100 std: a plain normal) and zero bias for Conv2d/Linear.
weight_init = nn.initializers.normal(0.02)


def resolve_variant(variant: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """'tiny', 'T' or 'convnext_tiny' -> (depths, dims)."""
  key = str(variant).lower().removeprefix("convnext_").removeprefix("convnext-")
  key = {"t": "tiny", "s": "small", "b": "base", "l": "large", "xl": "xlarge"}.get(key, key)
  if key not in VARIANTS:
    raise ValueError(
      f"unknown ConvNeXt variant {variant!r}; known: {sorted(VARIANTS)} (or give depths and dims)"
    )
  return VARIANTS[key]


class Block(nn.Module):
  """Official ConvNeXt `Block` / SparK `SparseConvNeXtBlock`."""

  dim: int
  drop_path: float = 0.0
  layer_scale_init_value: float = 1e-6
  kernel_size: int = 7
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, active=None, train: bool = False):
    pad = self.kernel_size // 2
    y = nn.Conv(
      self.dim,
      (self.kernel_size, self.kernel_size),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=self.dim,
      kernel_init=weight_init,
      dtype=self.dtype,
      name="dwconv",
    )(x)
    y = sparse.masked(y, active)
    y = sparse.masked(sparse.layer_norm("norm", self.dtype)(y), active)
    y = nn.Dense(4 * self.dim, kernel_init=weight_init, dtype=self.dtype, name="pwconv1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.dim, kernel_init=weight_init, dtype=self.dtype, name="pwconv2")(y)
    if self.layer_scale_init_value > 0:
      gamma = self.param(
        "gamma", nn.initializers.constant(self.layer_scale_init_value), (self.dim,), jnp.float32
      )
      y = y * gamma.astype(y.dtype)
    y = sparse.masked(y, active)
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), rng_collection="drop_path")(
      y, deterministic=not train or self.drop_path == 0.0
    )
    return x + y


class ConvNeXt(nn.Module):
  """Official ConvNeXt (see the module docstring). `variant` names an
  official size; `depths` / `dims` override it (e.g. narrow test models)."""

  variant: str = "tiny"
  depths: tuple[int, ...] | None = None
  dims: tuple[int, ...] | None = None
  num_classes: int = 0
  drop_path_rate: float = 0.0
  layer_scale_init_value: float = 1e-6
  head_init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  def arch(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    depths, dims = (None, None)
    if self.depths is None or self.dims is None:
      depths, dims = resolve_variant(self.variant)
    depths = tuple(int(d) for d in (self.depths if self.depths is not None else depths))
    dims = tuple(int(d) for d in (self.dims if self.dims is not None else dims))
    if len(depths) != 4 or len(dims) != 4:
      raise ValueError(f"a ConvNeXt has 4 stages, got depths={depths}, dims={dims}")
    return depths, dims

  def feature_channels(self) -> tuple[int, ...]:
    return self.arch()[1]

  @nn.compact
  def __call__(self, images, active=None, train: bool = False) -> CNNOutput:
    if active is not None:
      for size in images.shape[1:3]:
        sparse.grid_size(size)
    depths, dims = self.arch()
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    x = sparse.masked(images.astype(self.dtype), active)
    features = []
    cur = 0
    for i in range(4):
      if i == 0:
        x = nn.Conv(
          dims[0], (4, 4), strides=(4, 4), padding="VALID", kernel_init=weight_init,
          dtype=self.dtype, name="downsample_layers_0_0",
        )(x)  # fmt: skip
        x = sparse.masked(x, active)
        x = sparse.masked(sparse.layer_norm("downsample_layers_0_1", self.dtype)(x), active)
      else:
        x = sparse.masked(sparse.layer_norm(f"downsample_layers_{i}_0", self.dtype)(x), active)
        x = nn.Conv(
          dims[i], (2, 2), strides=(2, 2), padding="VALID", kernel_init=weight_init,
          dtype=self.dtype, name=f"downsample_layers_{i}_1",
        )(x)  # fmt: skip
        x = sparse.masked(x, active)
      for j in range(depths[i]):
        x = Block(
          dims[i],
          drop_path=float(rates[cur + j]),
          layer_scale_init_value=self.layer_scale_init_value,
          dtype=self.dtype,
          name=f"stages_{i}_{j}",
        )(x, active, train)
      cur += depths[i]
      features.append(x)
    logits = None
    if self.num_classes > 0:
      pooled = sparse.layer_norm("norm")(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
      head_init = lambda key, shape, dtype=jnp.float32: (
        weight_init(key, shape, dtype) * self.head_init_scale
      )
      logits = nn.Dense(self.num_classes, kernel_init=head_init, name="head")(pooled)
    return CNNOutput(tuple(features), logits)
