"""ResNet with timm's structure and parameter names (timm 0.5.4
`models/resnet.py`, the default 'b' variant = torchvision / ResNet v1.5),
dense or SparK-sparse (see `models/sparse.py`).

Structure: stem `conv1` 7x7 stride 2 pad 3 -> `bn1` -> ReLU -> max-pool 3x3
stride 2 pad 1; `layer1..4` of BasicBlock (3x3, 3x3) or Bottleneck (1x1,
3x3, 1x1; expansion 4) blocks, the stride on the 3x3 conv (v1.5), stride 1
for layer1 and 2 after, a `downsample` (1x1 conv + BN) on the first block
of a stage whose stride or width changes; drop path (timm DropPath, rate
`drop_path_rate * block_index / (num_blocks - 1)`) on the residual branch;
optional classifier: global average pool + `fc`.

Params mirror timm's names: `conv1`, `bn1`, `layer<s>_<b>/{conv1, bn1,
conv2, bn2[, conv3, bn3], downsample_0, downsample_1}`, `fc`; BatchNorm
statistics in `batch_stats`.

Widths: timm's `[64, 128, 256, 512]` planes and 64-channel stem, every
channel count divided by `div` (the input's 3 channels not), as the SparK
fixtures shrink the networks. The forward returns the four stage outputs
(strides 4, 8, 16, 32) and, with `num_classes > 0`, the logits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimdistill.models import sparse
from mimdistill.models.vit import torch_default_bias_init

Dtype = Any

# timm `resnet18` ... `resnet152`: (block, blocks per stage).
DEPTHS = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
}
BLOCKS = {"basic": 1, "bottleneck": 4}  # block type -> expansion
_BLOCK_ALIASES = {"basicblock": "basic", "bottleneck": "bottleneck"}
PLANES = (64, 128, 256, 512)
STEM_WIDTH = 64

# timm `init_weights`: kaiming-normal (fan_out, relu) for every conv; BN 1/0.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# nn.Linear's default init for `fc` (timm leaves it): U(-1/sqrt(fan_in), ..).
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class CNNOutput(NamedTuple):
  features: tuple[jax.Array, ...]  # NHWC, strides 4, 8, 16, 32
  logits: jax.Array | None  # None without a classifier


def resolve_depth(depth: int | str) -> tuple[str, tuple[int, ...]]:
  """`50`, `'50'` or `'resnet50'` -> ('bottleneck', (3, 4, 6, 3))."""
  key = str(depth).lower().removeprefix("resnet")
  if not key.isdigit() or int(key) not in DEPTHS:
    raise ValueError(
      f"unknown ResNet depth {depth!r}; known: {sorted(DEPTHS)} (or give `block` and `layers`)"
    )
  return DEPTHS[int(key)]


def resolve_block(block: str) -> str:
  key = _BLOCK_ALIASES.get(block.lower(), block.lower())
  if key not in BLOCKS:
    raise ValueError(f"unknown ResNet block {block!r}; known: {sorted(BLOCKS)}")
  return key


def _width(channels: int, div: int) -> int:
  if channels % div:
    raise ValueError(f"div={div} does not divide the channel count {channels}")
  return channels // div


def conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype, bias: bool = False):
  """torch Conv2d with symmetric padding `kernel // 2` (timm's `get_padding`
  for the odd kernels a ResNet uses)."""
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=bias,
    kernel_init=conv_init,
    dtype=dtype,
    name=name,
  )


class ResidualBlock(nn.Module):
  """timm BasicBlock / Bottleneck (conv-bn-act, stride on the 3x3 conv)."""

  block: str
  planes: int
  stride: int
  downsample: bool
  drop_path: float = 0.0
  zero_init_last_bn: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, active=None, train: bool = False):
    bn = lambda name, last=False: sparse.BatchNorm(
      scale_init=nn.initializers.zeros if last and self.zero_init_last_bn else nn.initializers.ones,
      dtype=self.dtype,
      name=name,
    )
    out_width = self.planes * BLOCKS[self.block]
    shortcut = x
    if self.block == "basic":
      y = sparse.masked(conv(self.planes, 3, self.stride, "conv1", self.dtype)(x), active)
      y = nn.relu(bn("bn1")(y, active, train))
      y = sparse.masked(conv(out_width, 3, 1, "conv2", self.dtype)(y), active)
      y = bn("bn2", last=True)(y, active, train)
    else:
      y = sparse.masked(conv(self.planes, 1, 1, "conv1", self.dtype)(x), active)
      y = nn.relu(bn("bn1")(y, active, train))
      y = sparse.masked(conv(self.planes, 3, self.stride, "conv2", self.dtype)(y), active)
      y = nn.relu(bn("bn2")(y, active, train))
      y = sparse.masked(conv(out_width, 1, 1, "conv3", self.dtype)(y), active)
      y = bn("bn3", last=True)(y, active, train)
    # timm DropPath: one Bernoulli per sample, survivors scaled by 1/keep.
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3), rng_collection="drop_path")(
      y, deterministic=not train or self.drop_path == 0.0
    )
    if self.downsample:
      shortcut = sparse.masked(
        conv(out_width, 1, self.stride, "downsample_0", self.dtype)(x), active
      )
      shortcut = bn("downsample_1")(shortcut, active, train)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """timm ResNet (see the module docstring).

  `depth` names a timm ResNet (18/34/50/101/152); `block` ('basic' /
  'bottleneck', also timm's class names) and `layers` override it.
  `active` (bool `(B, f, f)`, True = visible) runs SparK's sparse encoder on
  the masked image; None runs the dense network.
  """

  depth: int | str = 50
  block: str | None = None
  layers: tuple[int, ...] | None = None
  div: int = 1
  num_classes: int = 0
  drop_path_rate: float = 0.0
  zero_init_last_bn: bool = True  # timm's default; SparK's fixtures use False
  dtype: Dtype = jnp.float32

  def arch(self) -> tuple[str, tuple[int, ...]]:
    if self.block is not None and self.layers is not None:
      return resolve_block(self.block), tuple(int(n) for n in self.layers)
    block, layers = resolve_depth(self.depth)
    if self.block is not None:
      block = resolve_block(self.block)
    if self.layers is not None:
      layers = tuple(int(n) for n in self.layers)
    if len(layers) != 4:
      raise ValueError(f"a ResNet has 4 stages, got layers={layers}")
    return block, layers

  def feature_channels(self) -> tuple[int, ...]:
    """Output widths of layer1..4 (`get_feature_map_channels`)."""
    block, _ = self.arch()
    return tuple(_width(p, self.div) * BLOCKS[block] for p in PLANES)

  @nn.compact
  def __call__(self, images, active=None, train: bool = False) -> CNNOutput:
    if active is not None:
      for size in images.shape[1:3]:
        sparse.grid_size(size)
    block, layers = self.arch()
    x = sparse.masked(images.astype(self.dtype), active)
    x = sparse.masked(conv(_width(STEM_WIDTH, self.div), 7, 2, "conv1", self.dtype)(x), active)
    x = nn.relu(sparse.BatchNorm(dtype=self.dtype, name="bn1")(x, active, train))
    x = sparse.max_pool(x, active)
    total = sum(layers)
    index = 0
    in_width = _width(STEM_WIDTH, self.div)
    features = []
    for stage, num in enumerate(layers):
      planes = _width(PLANES[stage], self.div)
      for b in range(num):
        stride = (1 if stage == 0 else 2) if b == 0 else 1
        x = ResidualBlock(
          block=block,
          planes=planes,
          stride=stride,
          downsample=b == 0 and (stride != 1 or in_width != planes * BLOCKS[block]),
          drop_path=self.drop_path_rate * index / max(total - 1, 1),
          zero_init_last_bn=self.zero_init_last_bn,
          dtype=self.dtype,
          name=f"layer{stage + 1}_{b}",
        )(x, active, train)
        in_width = planes * BLOCKS[block]
        index += 1
      features.append(x)
    logits = None
    if self.num_classes > 0:
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      logits = nn.Dense(
        self.num_classes,
        kernel_init=linear_init,
        bias_init=torch_default_bias_init(in_width),
        name="fc",
      )(pooled)
    return CNNOutput(tuple(features), logits)
