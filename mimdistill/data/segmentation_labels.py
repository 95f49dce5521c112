"""Segmentation annotations: decoding, ADE20K's `reduce_zero_label`, and
the check that every label is a class or the ignore index."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def decode_annotation(value) -> np.ndarray:
  """An annotation feature (encoded PNG bytes or an array) as a 2-D array
  of class indices (uint8 for 8-bit maps). Palette PNGs give their
  indices, 16-bit maps their values; a 3-channel map (TFDS stores some
  single-channel annotations as RGB) must have equal channels."""
  if isinstance(value, (bytes, bytearray)):
    image = Image.open(io.BytesIO(value))
    array = np.asarray(image)
  else:
    array = np.asarray(value)
  if array.ndim == 3:
    if array.shape[-1] != 1 and not (array == array[..., :1]).all():
      raise ValueError(
        f"annotation has {array.shape[-1]} differing channels; expected a single-channel "
        "class-index map (e.g. an 8-bit 'L' or palette PNG)"
      )
    array = array[..., 0]
  return array


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg `LoadAnnotations(reduce_zero_label=True)` on a uint8 map:
  0 ('other') -> 255, v -> v - 1, 255 stays 255."""
  label = np.asarray(label, np.uint8)
  out = label.astype(np.int16) - 1
  out[label == 0] = IGNORE_INDEX
  out[label == IGNORE_INDEX] = IGNORE_INDEX
  return out.astype(np.uint8)


def check_labels(label: np.ndarray, num_classes: int, what: str = "annotation") -> None:
  """Refuses label values >= num_classes other than the ignore index."""
  values = np.unique(label)
  bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
  if bad.size:
    raise ValueError(
      f"{what} has label values {bad.tolist()[:10]} >= num_classes={num_classes} (only "
      f"{IGNORE_INDEX} may exceed it, as the ignore index); set num_classes, or "
      "reduce_zero_label for ADE20K-style annotations whose 0 means 'other'"
    )
