"""`mimdistill_shapes_seg`: the embedded shapes as a segmentation dataset.

Each 64x64 image holds 1 to 3 random shapes of the ten `embedded_shapes`
classes over one background, drawn by `embedded_shapes.render_scene` (the
same rasteriser, colours and noise as the classification dataset), with
the per-pixel class map it draws: 0 = background, 1 + shape class where a
shape covers at least half of the pixel (later shapes on top). 11 classes,
no ignored pixels. Generated from a fixed seed in seconds, prepared once
into the TFDS data dir in `array_record` format (PNG image and annotation,
no TensorFlow), so the segmentation stage runs with no download: in tests,
in the quickstart. Features as `segmentation_folders` / `scene_parse150`:
`image`, `annotation`, `id`.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mimdistill.data import embedded_shapes, local_builder

CLASS_NAMES = ("background",) + embedded_shapes.CLASS_NAMES
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 64
MAX_SHAPES = 3
SPLIT_SIZES = {"train": 1000, "test": 200}
SEED = 20230132
_SPLIT_STREAM = {"train": 0, "test": 1}


def generate(split: str, num_examples: int | None = None, seed: int = SEED, size: int = IMAGE_SIZE):
  """Yields (index, uint8[size, size, 3] image, uint8[size, size] classes);
  each example has its own random stream from (seed, split, index)."""
  if split not in SPLIT_SIZES:
    raise ValueError(
      f"unknown split {split!r} of {SegShapesBuilder.name}; use {sorted(SPLIT_SIZES)}"
    )
  num_examples = SPLIT_SIZES[split] if num_examples is None else num_examples
  n_shapes = len(embedded_shapes.CLASS_NAMES)
  for index in range(num_examples):
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split], index]))
    labels = rng.integers(0, n_shapes, size=int(rng.integers(1, MAX_SHAPES + 1)))
    image, classes = embedded_shapes.render_scene(labels, rng, size)
    yield index, image, classes


def encode_png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


class SegShapesBuilder(local_builder.LocalBuilder):
  """TFDS builder of the embedded segmentation dataset."""

  name = "mimdistill_shapes_seg"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
          "annotation": tfds.features.Image(
            shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format="png"
          ),
          "id": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    for index, image, classes in generate(split):
      key = f"{split}_{index:05d}"
      yield key, {"image": encode_png(image), "annotation": encode_png(classes), "id": key}
