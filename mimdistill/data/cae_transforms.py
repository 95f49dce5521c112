"""CAE v2 pre-training augmentation (Atten4Vis/CAE `furnace/datasets.py`
`DataAugmentationForCAE` with the CAE v2 scripts' flags) and its block mask.

  ColorJitter(0.4, 0.4, 0.4) -> RandomHorizontalFlip(0.5) ->
  RandomResizedCrop(size, scale=(0.4, 1.0), ratio (3/4, 4/3), bicubic)

on the PIL image, as the official `common_transform` orders them. The
official `RandomResizedCropAndInterpolationWithTwoPic` resizes one crop box
twice, for the student (`input_size`) and for the CLIP teacher
(`second_input_size`); every CAE v2 script uses 224 and bicubic for both, so
the two views are the same pixels and only their normalisation differs.
One image is emitted as uint8 pixels (a quarter of float32's bytes); the
step normalises it for the student (ImageNet mean/std, the official
`--imagenet_default_mean_and_std`) and renormalises that for the teacher.

The block mask (`data.block_masking.BlockMaskGenerator`, the official
`MaskingGenerator`) is drawn from the same per-example generator, after
the crop: a function of (seed, stream position), so a resumed run draws
the same masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from mimdistill.data import transforms
from mimdistill.data.block_masking import BlockMaskGenerator


class CaeTrain:
  """(PIL image, rng) -> {'image': f32[H, W, 3], 'patch_mask': bool[gh, gw]}
  (True = masked, exactly `mask.num_masking_patches` per example)."""

  def __init__(
    self,
    size: int,
    mask: BlockMaskGenerator,
    scale: Sequence[float] = (0.4, 1.0),
    jitter: float = 0.4,
  ):
    self.size, self.mask, self.scale, self.jitter = size, mask, tuple(scale), float(jitter)

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
    j = self.jitter
    image = transforms.color_jitter(image, rng, j, j, j)
    image = transforms.random_horizontal_flip(image, rng)
    image = transforms.random_resized_crop(image, rng, self.size, self.scale)
    return {"image": transforms.to_uint8_array(image), "patch_mask": self.mask(rng)}
