"""The heterogeneous (H-GKD-style) CNN student: SparK's sparse encoder,
densify and LightDecoder (`models/spark.py`) plus a 1x1 projection of the
decoder's features at the teacher's patch stride to the teacher's width.

H-GKD (arXiv 2309.09571) distils a MIM ViT into a UNet-style CNN trained
with sparse convolution on masked images but published no code and no
details of its head; this head is OUR design: the decoder map of stride `p`
(the teacher's patch size, in the student's pixels) is the one whose cells
are the teacher's patches, so a 1x1 conv (`teacher_proj`, torch's default
init) predicts one teacher token per cell, row-major like the ViT's patch
sequence. Stride 32 is the decoder input (densified level 0), stride
32 / 2^k the output of decoder block k. `p` must divide 32 so that every
cell of the stride-32 mask grid covers `(32 / p)^2` whole teacher patches.

With `pixel_loss` the whole SparK decoder (five blocks and `proj`) is built
for its reconstruction; without it only the blocks up to stride `p`, so no
parameter is left that the loss cannot reach (`SparK.decoder_blocks`).

Params: SparK's tree (`encoder`, `densify_*`, `mask_tokens_*`,
`dense_decoder`) with the SparK module's scope shared, plus `teacher_proj`;
the same names as a SparK checkpoint, so SparK's export reads them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from mimdistill.models import sparse
from mimdistill.models.spark import SparK, SparKOutput, torch_conv_init
from mimdistill.models.vit import torch_default_bias_init

Dtype = Any


class HeteroOutput(NamedTuple):
  spark: SparKOutput  # features, densified maps, decoder blocks, rec (None without pixel loss)
  feature: jax.Array  # (B, g, g, C) the decoder map at the teacher's patch stride
  tokens: jax.Array  # (B, g * g, teacher_width) predicted teacher tokens, row-major


def decoder_blocks_for(patch: int, ratio: int = sparse.DOWNSAMPLE_RATIO) -> int:
  """Decoder blocks up to stride `patch`: 32 -> 0 (the decoder input), 16 -> 1, ..."""
  k = round(math.log2(ratio / patch)) if patch > 0 else -1
  if patch <= 0 or ratio % patch or 2**k * patch != ratio:
    divisors = [ratio // 2**i for i in range(round(math.log2(ratio)) + 1)]
    raise ValueError(
      f"teacher patch stride {patch} does not divide the student's mask grid stride {ratio}: "
      f"a mask cell would cut teacher patches; use a teacher patch size in {divisors}"
    )
  return k


def feature_at_stride(out: SparKOutput, patch: int) -> jax.Array:
  """The decoder map whose stride is `patch` (see the module docstring)."""
  k = decoder_blocks_for(patch)
  return out.to_dec[0] if k == 0 else out.decoder_blocks[k - 1]


class HeteroStudent(nn.Module):
  """See the module docstring. `spark.decoder_blocks` must be None (pixel
  loss) or `decoder_blocks_for(teacher_patch)`."""

  spark: SparK
  teacher_width: int
  teacher_patch: int = 16

  def setup(self):
    nn.share_scope(self, self.spark)
    k = decoder_blocks_for(self.teacher_patch)
    if self.spark.decoder_blocks is not None and self.spark.decoder_blocks < k:
      raise ValueError(
        f"the SparK decoder runs {self.spark.decoder_blocks} blocks, the teacher's stride "
        f"{self.teacher_patch} needs {k}"
      )
    self.teacher_proj = nn.Conv(
      self.teacher_width,
      (1, 1),
      kernel_init=torch_conv_init,
      bias_init=torch_default_bias_init(self._feature_width()),
      dtype=self.spark.dtype,
    )

  def _feature_width(self) -> int:
    k = decoder_blocks_for(self.teacher_patch)
    return self.spark.decoder_width // 2**k

  def __call__(self, images, active, train: bool = False) -> HeteroOutput:
    out = self.spark(images, active, train)
    feature = feature_at_stride(out, self.teacher_patch)
    tokens = self.teacher_proj(feature)
    b, gh, gw, d = tokens.shape
    return HeteroOutput(out, feature, tokens.reshape(b, gh * gw, d))
