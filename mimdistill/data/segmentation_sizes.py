"""The padded eval canvas of a segmentation split: the largest
keep-ratio-resized image and the largest annotation over the split, as
(short side, long side) (`SegmentationPreprocess` stores portrait images
transposed), measured from the image headers once before evaluation.

The annotation keeps the image's original size (mmseg scores at the
original resolution and needs equal sizes), so the image header gives
both; the pixels are never decoded.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mimdistill.data.segmentation_transforms import rescale_size


def image_hw(value) -> tuple[int, int]:
  """(h, w) of an image feature (encoded bytes: header only; or an array)."""
  if isinstance(value, (bytes, bytearray)):
    with Image.open(io.BytesIO(value)) as image:
      w, h = image.size
    return int(h), int(w)
  shape = np.shape(value)
  return int(shape[0]), int(shape[1])


def _short_long(h: int, w: int) -> tuple[int, int]:
  return (h, w) if h <= w else (w, h)


def eval_canvas(
  source, img_scale, image_key: str = "image"
) -> tuple[tuple[int, int], tuple[int, int]]:
  """`((short, long) of the largest resized image, (short, long) of the
  largest original)` over the records of `source` (random access)."""
  resized, original = (0, 0), (0, 0)
  for i in range(len(source)):
    h, w = image_hw(source[i][image_key])
    rs, rl = _short_long(*rescale_size(h, w, img_scale))
    os_, ol = _short_long(h, w)
    resized = (max(resized[0], rs), max(resized[1], rl))
    original = (max(original[0], os_), max(original[1], ol))
  if not len(source):
    raise ValueError("the eval split is empty")
  return resized, original
