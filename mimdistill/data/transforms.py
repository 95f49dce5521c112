"""Image augmentations in numpy/PIL with torchvision's semantics.

The official MAE and TinyMIM pipelines are torchvision transforms on PIL
images; they are re-implemented here (no torch) so that the crops, the
interpolation and the colour jitter are the same operations on the same
pixels. Only the random number stream differs: every random draw comes from
a `np.random.Generator` handed in by the caller (the input pipeline derives one
per example from (seed, stream position), which makes augmentation
deterministic and resumable).

Images come in as `PIL.Image.Image` (RGB) and go out as uint8 HWC arrays
(the JAX layout); `normalize`, inside the training step on the device, turns
them into the float32 values torchvision's `ToTensor()` + `Normalize(...)`
give with the ImageNet mean/std, bit for bit.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The fine-tuning evaluation of MAE/DeiT resizes to size / crop_pct, then
# center-crops: 256 -> 224 at ImageNet resolution.
DEFAULT_CROP_PCT = 224 / 256
BICUBIC = Image.Resampling.BICUBIC  # torchvision interpolation=3


# ---------------------------------------------------------------------------
# Geometric transforms
# ---------------------------------------------------------------------------
def random_resized_crop_params(
  rng: np.random.Generator,
  width: int,
  height: int,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: returns (top, left, h, w).

  Ten attempts at an area fraction uniform in `scale` and an aspect ratio
  log-uniform in `ratio`; the first crop that fits wins. Otherwise falls back
  to a center crop of the whole image with its aspect ratio clamped to
  `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    # Python's round (half to even) as in torchvision.
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      # torch.randint(0, n + 1): inclusive of n.
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
  image: Image.Image,
  rng: np.random.Generator,
  size: int,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> Image.Image:
  """torchvision `RandomResizedCrop(size, scale, ratio, interpolation=3)`."""
  top, left, h, w = random_resized_crop_params(rng, image.width, image.height, scale, ratio)
  # Crop, then resize: `F.resized_crop` on PIL images does exactly this.
  return image.crop((left, top, left + w, top + h)).resize((size, size), BICUBIC)


def random_horizontal_flip(
  image: Image.Image, rng: np.random.Generator, p: float = 0.5
) -> Image.Image:
  """torchvision `RandomHorizontalFlip(p)`."""
  if rng.random() < p:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """torchvision `Resize(size)` (an int) on a PIL image, bicubic."""
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) == (w, h):
    return image
  return image.resize((new_w, new_h), BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
  """torchvision `CenterCrop(size)` (the image is at least `size` large)."""
  w, h = image.size
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------
def _jitter_range(strength: float) -> tuple[float, float] | None:
  """torchvision's factor range [max(0, 1 - x), 1 + x]; None if disabled."""
  if strength < 0:
    raise ValueError(f"Colour jitter strength must be >= 0, got {strength}.")
  if strength == 0:
    return None
  return max(0.0, 1.0 - strength), 1.0 + strength


def color_jitter(
  image: Image.Image,
  rng: np.random.Generator,
  brightness: float = 0.0,
  contrast: float = 0.0,
  saturation: float = 0.0,
) -> Image.Image:
  """torchvision `ColorJitter(brightness, contrast, saturation)` (no hue).

  The enabled adjustments run in a random order, each with a factor uniform
  in [max(0, 1 - x), 1 + x]; on PIL images torchvision implements them with
  `PIL.ImageEnhance` (Brightness, Contrast, Color), as done here.
  """
  adjustments = [
    (ImageEnhance.Brightness, _jitter_range(brightness)),
    (ImageEnhance.Contrast, _jitter_range(contrast)),
    (ImageEnhance.Color, _jitter_range(saturation)),
  ]
  for i in rng.permutation(len(adjustments)):
    enhancer, bounds = adjustments[i]
    if bounds is not None:
      image = enhancer(image).enhance(rng.uniform(*bounds))
  return image


# `ToTensor()` + `Normalize(IMAGENET_MEAN, IMAGENET_STD)` of every uint8 value
# per channel, computed once with torch's float32 operations. The input
# pipeline sends uint8 pixels (a quarter of float32's bytes) and the step
# looks them up on the device (`normalize`): the same float32 values, bit for
# bit, as normalising on the host (a division on the device would not be: XLA
# multiplies by the reciprocal).
NORMALIZED = (np.arange(256, dtype=np.float32)[:, None] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def to_uint8_array(image: Image.Image) -> np.ndarray:
  """The RGB pixels as uint8 HWC (what the pipeline sends to the devices)."""
  return np.asarray(image, dtype=np.uint8)


def to_normalized_array(image: Image.Image) -> np.ndarray:
  """`ToTensor()` + `Normalize(IMAGENET_MEAN, IMAGENET_STD)`, as float32 HWC."""
  pixels = np.asarray(image, dtype=np.float32) / 255.0
  return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def normalize(images):
  """Model input from a batch's images: uint8 pixels (numpy or jax, any
  leading shape, RGB last) become `to_normalized_array`'s float32 values;
  float images (already normalised on the host, e.g. after mixup or random
  erasing) pass through. Runs inside the jitted step."""
  if images.dtype != np.uint8:
    return images
  import jax.numpy as jnp

  table = jnp.asarray(NORMALIZED)
  return table[images.astype(jnp.int32), jnp.arange(images.shape[-1])]


def denormalize(array: np.ndarray) -> np.ndarray:
  """Inverse of `to_normalized_array`, to [0, 1] (for viewing and tests)."""
  return array * IMAGENET_STD + IMAGENET_MEAN


# ---------------------------------------------------------------------------
# The stage recipes. Each maps (PIL RGB image, rng) -> dict of uint8 HWC.
# ---------------------------------------------------------------------------
class MaeTrain:
  """MAE pre-training: RandomResizedCrop(scale) bicubic + flip + normalise."""

  def __init__(self, size: int, scale: Sequence[float] = (0.2, 1.0)):
    self.size, self.scale = size, tuple(scale)

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = random_resized_crop(image, rng, self.size, self.scale)
    image = random_horizontal_flip(image, rng)
    return {"image": to_uint8_array(image)}


class DistillTrain:
  """TinyMIM distillation: one crop for both views, jitter on the student's.

  `image` is the teacher's view, `image_student` the same crop and flip with
  ColorJitter(b, c, s) applied on top.
  """

  def __init__(
    self, size: int, scale: Sequence[float] = (0.2, 1.0), jitter: Sequence[float] = (0.4, 0.4, 0.4)
  ):
    self.size, self.scale = size, tuple(scale)
    self.brightness, self.contrast, self.saturation = jitter

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = random_resized_crop(image, rng, self.size, self.scale)
    image = random_horizontal_flip(image, rng)
    student = color_jitter(image, rng, self.brightness, self.contrast, self.saturation)
    return {"image": to_uint8_array(image), "image_student": to_uint8_array(student)}


class Eval:
  """Evaluation: Resize(int(size / crop_pct)) bicubic + CenterCrop(size)."""

  def __init__(self, size: int, crop_pct: float = DEFAULT_CROP_PCT):
    self.size, self.crop_pct = size, crop_pct

  def __call__(
    self, image: Image.Image, rng: np.random.Generator | None = None
  ) -> dict[str, np.ndarray]:
    del rng  # Deterministic.
    image = resize_shorter_side(image, int(self.size / self.crop_pct))
    return {"image": to_uint8_array(center_crop(image, self.size))}


Transform = Callable[[Image.Image, np.random.Generator], dict[str, np.ndarray]]
