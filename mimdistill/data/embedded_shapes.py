"""`mimdistill_shapes`: a procedurally generated 10-class image dataset.

The quickstart and the tests need real images without a download, so this
dataset is generated from a fixed seed with numpy in a few seconds: one
foreground shape per 32x32 RGB image on a random background (flat colour,
colour gradient or low-frequency noise texture), with random colours, position,
size and rotation, plus pixel noise. The class is the shape. Colours and
backgrounds carry no label information, so a model must learn shape, yet the
task is easy enough for a tiny ViT to pass chance within minutes.

It is a TFDS `GeneratorBasedBuilder`, prepared once into the TFDS data dir in
`array_record` format (images PNG-encoded), so it is read through exactly the
same `tfds.data_source` + grain path as ImageNet.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mimdistill.data import local_builder

CLASS_NAMES = (
  "circle",
  "square",
  "triangle",
  "cross",
  "ring",
  "stripes",
  "checkerboard",
  "gradient",
  "dots",
  "star",
)
IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 5000, "test": 1000}
SEED = 20230131  # Fixed: the dataset is part of the package, not a user choice.

# Shapes are rasterised on a grid this many times finer than the image and
# averaged down: anti-aliased edges, so a shape is not a pixel-exact template.
_SUPERSAMPLE = 2
# Every split gets its own random stream, so adding a split never changes
# the images of another.
_SPLIT_STREAM = {"train": 0, "test": 1}


def _shape_mask(
  label: int, rng: np.random.Generator, size: int, *, star_hole: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """(coverage, pattern) of a random shape of class `label`.

  Both float32[size, size] in [0, 1]: `coverage` is the anti-aliased fraction
  of each pixel inside the shape; `pattern` (already multiplied by the
  coverage) picks between the two foreground colours inside it (stripes,
  checks, ramp; equal to the coverage for solid shapes).
  """
  n = size * _SUPERSAMPLE
  coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
  y, x = np.meshgrid(coords, coords, indexing="ij")
  radius = rng.uniform(0.2, 0.4) * size
  cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
  angle = rng.uniform(0, 2 * np.pi)
  # Shape-local coordinates: rotated, and scaled so the shape spans [-1, 1].
  dx, dy = (x - cx) / radius, (y - cy) / radius
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  rho = np.sqrt(u * u + v * v)
  in_square = np.maximum(np.abs(u), np.abs(v)) <= 0.85
  pattern = np.ones_like(u)

  name = CLASS_NAMES[label]
  if name == "circle":
    inside = rho <= 1.0
  elif name == "square":
    inside = in_square
  elif name == "triangle":
    # Equilateral triangle: inside all three half-planes whose outward normals
    # point at 90, 210 and 330 degrees.
    inside = np.ones_like(u, dtype=bool)
    for theta in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6):
      inside &= u * np.cos(theta) + v * np.sin(theta) <= 0.6
  elif name == "cross":
    arm = 0.3
    inside = ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
  elif name == "ring":
    inside = (rho <= 1.0) & (rho >= rng.uniform(0.45, 0.65))
  elif name == "stripes":
    inside = in_square
    pattern = (np.sin(u * np.pi * rng.uniform(1.5, 2.5)) > 0).astype(np.float32)
  elif name == "checkerboard":
    inside = in_square
    cells = rng.integers(2, 4)
    pattern = ((np.floor((u + 1) * cells) + np.floor((v + 1) * cells)) % 2).astype(np.float32)
  elif name == "gradient":
    inside = in_square
    pattern = np.clip((u + 0.85) / 1.7, 0.0, 1.0)
  elif name == "dots":
    inside = np.zeros_like(u, dtype=bool)
    for _ in range(rng.integers(4, 8)):
      r = np.sqrt(rng.uniform(0, 0.8))
      t = rng.uniform(0, 2 * np.pi)
      inside |= (u - r * np.cos(t)) ** 2 + (v - r * np.sin(t)) ** 2 <= 0.25**2
  elif name == "star":
    # Five-pointed star: fold the polar angle into one 72-degree sector with
    # its tip on the +x axis, then test against the tip-to-inner-vertex edge.
    inner = 0.45
    t = np.abs(np.mod(np.arctan2(v, u), 2 * np.pi / 5) - np.pi / 5)
    t = np.pi / 5 - t  # 0 at the tip, pi/5 at the inner vertex
    px, py = rho * np.cos(t), rho * np.sin(t)
    ix, iy = inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)
    # The classification dataset's test keeps the side away from the
    # origin, i.e. everything but a star-shaped hole (`star_hole`, kept so
    # its images never change); the star itself is the origin's side.
    side = (px - 1.0) * iy - py * (ix - 1.0)
    inside = side >= 0 if star_hole else side < 0
  else:
    raise AssertionError(name)

  def downsample(a):
    return a.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))

  return (downsample(inside.astype(np.float32)), downsample(pattern.astype(np.float32) * inside))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """float32[size, size, 3] in [0, 255]: flat, gradient or noise texture."""
  kind = rng.integers(3)
  c0 = rng.uniform(0, 255, size=3).astype(np.float32)
  if kind == 0:
    return np.broadcast_to(c0, (size, size, 3)).copy()
  if kind == 1:
    c1 = rng.uniform(0, 255, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    t = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    t = (t - t.min()) / (t.max() - t.min())
    return c0 + (c1 - c0) * t[..., None]
  # Low-frequency texture: coarse random grid upsampled bicubically.
  cells = int(rng.integers(2, 6))
  coarse = rng.uniform(-60, 60, size=(cells, cells, 3)).astype(np.float32)
  channels = [
    np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((size, size), Image.BICUBIC))
    for c in range(3)
  ]
  return c0 + np.stack(channels, axis=-1)


def _paint_shape(
  image: np.ndarray, label: int, rng: np.random.Generator, size: int, star_hole: bool = True
):
  """Draws one random shape of class `label` over float32 `image`; returns
  (image, coverage) with coverage float32[size, size] in [0, 1]."""
  coverage, pattern = _shape_mask(label, rng, size, star_hole=star_hole)
  # A foreground colour far enough from the mean background to stay visible;
  # the pattern blends it with a second colour (stripes, checks, gradient).
  mean_bg = image.mean(axis=(0, 1))
  for _ in range(20):
    fg = rng.uniform(0, 255, size=3).astype(np.float32)
    if np.abs(fg - mean_bg).sum() > 150:
      break
  fg2 = rng.uniform(0, 255, size=3).astype(np.float32)
  # `pattern` is already multiplied by coverage; renormalise inside the shape.
  weight = np.divide(pattern, coverage, out=np.zeros_like(pattern), where=coverage > 0)[..., None]
  shape_colour = fg2 + (fg - fg2) * weight
  image = image * (1 - coverage[..., None]) + shape_colour * coverage[..., None]
  return image, coverage


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  # In place: the float64 noise is added into the float32 image (the
  # classification dataset's pixels depend on that rounding).
  image += rng.normal(0, rng.uniform(2, 15), size=image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render(
  label: int, rng: np.random.Generator, size: int = IMAGE_SIZE, *, return_mask: bool = False
):
  """One image of class `label`: uint8[size, size, 3]; with `return_mask`
  also the bool[size, size] mask of the pixels the shape covers at least
  half of (the same random draws, so the image is unchanged)."""
  image, coverage = _paint_shape(_background(rng, size), label, rng, size)
  image = _finish(image, rng)
  return (image, coverage >= 0.5) if return_mask else image


def render_scene(labels, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Several shapes (`labels`, drawn in order, later ones on top) over one
  background: `(uint8[size, size, 3], uint8[size, size] class map)` with
  0 for the background and `1 + label` where a shape covers at least half
  of the pixel and no later shape covers half of it. A 'star' here is the
  star itself, not the classification images' star-shaped hole (which
  would cover most of a scene)."""
  image = _background(rng, size)
  classes = np.zeros((size, size), np.uint8)
  for label in labels:
    image, coverage = _paint_shape(image, int(label), rng, size, star_hole=False)
    classes[coverage >= 0.5] = 1 + int(label)
  return _finish(image, rng), classes


def generate(split: str, num_examples: int | None = None, seed: int = SEED):
  """Yields (index, label, uint8[32, 32, 3]) for `split`, deterministically.

  Labels cycle through the classes, so every class has exactly
  num_examples / 10 images; each image has its own random stream derived from
  (seed, split, index), so any single image can be regenerated on its own.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(
      f"Unknown split {split!r} of {ShapesBuilder.name}; use one of {sorted(SPLIT_SIZES)}."
    )
  num_examples = SPLIT_SIZES[split] if num_examples is None else num_examples
  for index in range(num_examples):
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split], index]))
    label = index % len(CLASS_NAMES)
    yield index, label, render(label, rng)


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  # PNG is lossless and deterministic for a given Pillow build, so the stored
  # bytes (not only the pixels) are reproducible.
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class ShapesBuilder(local_builder.LocalBuilder):
  """TFDS builder of the embedded shapes dataset (`mimdistill_shapes`)."""

  name = "mimdistill_shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly (not `dataset_info_from_configs`), which
    # would look for metadata files next to this module.
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=CLASS_NAMES),
          "id": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    for index, label, image in generate(split):
      key = f"{split}_{index:05d}"
      # Bytes are passed through as-is by tfds.features.Image: encoding here
      # with PIL keeps TensorFlow out of the preparation.
      yield key, {"image": encode_png(image), "label": label, "id": key}
