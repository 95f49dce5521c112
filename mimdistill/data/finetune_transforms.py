"""Fine-tuning and linear-probing augmentations (timm 0.3.2 / MAE semantics).

MAE's `main_finetune.py` builds its training transform with timm 0.3.2:

    create_transform(input_size, is_training=True, color_jitter=None,
                     auto_augment='rand-m9-mstd0.5-inc1',
                     interpolation='bicubic', re_prob=0.25, re_mode='pixel',
                     re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)

which is RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3), bicubic) ->
RandomHorizontalFlip -> RandAugment -> ToTensor + Normalize ->
RandomErasing (on the normalised tensor). `main_linprobe.py` uses MAE's own
`util/crop.RandomResizedCrop` (a single draw, no retry loop) + flip +
normalise. Both are re-implemented here on PIL images and numpy arrays, with
timm's operations, levels, fill colour and probabilities; as in
`transforms`, every random draw comes from the `np.random.Generator` handed
in by the caller (timm draws from Python's `random` and numpy's global
state), so an example's augmentation is a function of (seed, position).

Mixup/CutMix acts on whole batches: see `mixup`.
"""

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mimdistill.data import transforms

DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
RE_MODES = ("const", "rand", "pixel")

# ---------------------------------------------------------------------------
# RandAugment (timm.data.auto_augment, 0.3.2)
# ---------------------------------------------------------------------------
_MAX_LEVEL = 10.0  # Magnitudes live in [0, _MAX_LEVEL].
_FILL = (128, 128, 128)  # timm's default; create_transform passes the mean.
_HPARAMS_DEFAULT = dict(translate_const=250, img_mean=_FILL)
_BILINEAR = Image.Resampling.BILINEAR
_BICUBIC = Image.Resampling.BICUBIC
_RANDOM_INTERPOLATION = (_BILINEAR, _BICUBIC)
_INTERPOLATIONS = {
  "bilinear": _BILINEAR,
  "bicubic": _BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
  "hamming": Image.Resampling.HAMMING,
}


def pil_interpolation(method):
  """timm `_pil_interp`: a name (or 'random') -> PIL filter(s)."""
  if method == "random":
    return _RANDOM_INTERPOLATION
  if isinstance(method, str):
    # timm maps every other name to bilinear.
    return _INTERPOLATIONS.get(method, _BILINEAR)
  return method


def _affine(img, matrix, fill, resample):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


# Operations: (img, *level args, fill=, resample=) -> img. Only the geometric
# ones use fill and resample.
def shear_x(img, factor, *, fill, resample):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, *, fill, resample):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(img, pct, *, fill, resample):
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def translate_y_rel(img, pct, *, fill, resample):
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def translate_x_abs(img, pixels, *, fill, resample):
  return _affine(img, (1, 0, pixels, 0, 1, 0), fill, resample)


def translate_y_abs(img, pixels, *, fill, resample):
  return _affine(img, (1, 0, 0, 0, 1, pixels), fill, resample)


def rotate(img, degrees, *, fill, resample):
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img, **_):
  return ImageOps.autocontrast(img)


def invert(img, **_):
  return ImageOps.invert(img)


def equalize(img, **_):
  return ImageOps.equalize(img)


def solarize(img, thresh, **_):
  return ImageOps.solarize(img, thresh)


def solarize_add(img, add, thresh=128, **_):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  if img.mode not in ("L", "RGB"):
    return img
  return img.point(lut * 3 if img.mode == "RGB" else lut)


def posterize(img, bits_to_keep, **_):
  if bits_to_keep >= 8:
    return img
  # `ImageOps.posterize` as in the Pillow of 2020; Pillow >= 11 refuses
  # bits=0 (magnitude 10 of PosterizeIncreasing), which gave a black image.
  mask = ~(2 ** (8 - bits_to_keep) - 1)
  lut = [i & mask for i in range(256)]
  return img.point(lut * len(img.getbands()))


def contrast(img, factor, **_):
  return ImageEnhance.Contrast(img).enhance(factor)


def color(img, factor, **_):
  return ImageEnhance.Color(img).enhance(factor)


def brightness(img, factor, **_):
  return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img, factor, **_):
  return ImageEnhance.Sharpness(img).enhance(factor)


# Level (magnitude in [0, 10]) -> op arguments; some flip a coin for the sign.
def _randomly_negate(v, rng):
  # timm: `-v if random.random() > 0.5 else v`.
  return -v if rng.random() > 0.5 else v


def _rotate_level_to_arg(level, _hparams, rng):
  return (_randomly_negate(level / _MAX_LEVEL * 30.0, rng),)  # [-30, 30]


def _enhance_level_to_arg(level, _hparams, _rng):
  return (level / _MAX_LEVEL * 1.8 + 0.1,)  # [0.1, 1.9]


def _enhance_increasing_level_to_arg(level, _hparams, rng):
  # 1.0 is 'no change'; the blend moves away from it as the level grows.
  return (1.0 + _randomly_negate(level / _MAX_LEVEL * 0.9, rng),)


def _shear_level_to_arg(level, _hparams, rng):
  return (_randomly_negate(level / _MAX_LEVEL * 0.3, rng),)  # [-0.3, 0.3]


def _translate_abs_level_to_arg(level, hparams, rng):
  return (_randomly_negate(level / _MAX_LEVEL * float(hparams["translate_const"]), rng),)


def _translate_rel_level_to_arg(level, hparams, rng):
  pct = hparams.get("translate_pct", 0.45)  # [-0.45, 0.45]
  return (_randomly_negate(level / _MAX_LEVEL * pct, rng),)


def _posterize_level_to_arg(level, _hparams, _rng):
  return (int(level / _MAX_LEVEL * 4),)  # Keep 0..4 bits: decreasing severity.


def _posterize_increasing_level_to_arg(level, hparams, rng):
  return (4 - _posterize_level_to_arg(level, hparams, rng)[0],)  # 4..0 bits.


def _posterize_original_level_to_arg(level, _hparams, _rng):
  return (int(level / _MAX_LEVEL * 4) + 4,)  # 4..8 bits.


def _solarize_level_to_arg(level, _hparams, _rng):
  return (int(level / _MAX_LEVEL * 256),)  # Threshold 0..256.


def _solarize_increasing_level_to_arg(level, hparams, rng):
  return (256 - _solarize_level_to_arg(level, hparams, rng)[0],)


def _solarize_add_level_to_arg(level, _hparams, _rng):
  return (int(level / _MAX_LEVEL * 110),)  # [0, 110]


# name -> (op, level_to_arg or None, geometric: uses fill and resample)
OPS: dict[str, tuple[Callable, Callable | None, bool]] = {
  "AutoContrast": (auto_contrast, None, False),
  "Equalize": (equalize, None, False),
  "Invert": (invert, None, False),
  "Rotate": (rotate, _rotate_level_to_arg, True),
  "Posterize": (posterize, _posterize_level_to_arg, False),
  "PosterizeIncreasing": (posterize, _posterize_increasing_level_to_arg, False),
  "PosterizeOriginal": (posterize, _posterize_original_level_to_arg, False),
  "Solarize": (solarize, _solarize_level_to_arg, False),
  "SolarizeIncreasing": (solarize, _solarize_increasing_level_to_arg, False),
  "SolarizeAdd": (solarize_add, _solarize_add_level_to_arg, False),
  "Color": (color, _enhance_level_to_arg, False),
  "ColorIncreasing": (color, _enhance_increasing_level_to_arg, False),
  "Contrast": (contrast, _enhance_level_to_arg, False),
  "ContrastIncreasing": (contrast, _enhance_increasing_level_to_arg, False),
  "Brightness": (brightness, _enhance_level_to_arg, False),
  "BrightnessIncreasing": (brightness, _enhance_increasing_level_to_arg, False),
  "Sharpness": (sharpness, _enhance_level_to_arg, False),
  "SharpnessIncreasing": (sharpness, _enhance_increasing_level_to_arg, False),
  "ShearX": (shear_x, _shear_level_to_arg, True),
  "ShearY": (shear_y, _shear_level_to_arg, True),
  "TranslateX": (translate_x_abs, _translate_abs_level_to_arg, True),
  "TranslateY": (translate_y_abs, _translate_abs_level_to_arg, True),
  "TranslateXRel": (translate_x_rel, _translate_rel_level_to_arg, True),
  "TranslateYRel": (translate_y_rel, _translate_rel_level_to_arg, True),
}

RAND_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
# 'inc1': severity increases with the magnitude for every op.
RAND_INCREASING_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
# 'w0': timm's experimental op weights, listed in RAND_TRANSFORMS order (timm
# applies them by position to whichever op list is in use).
_RAND_CHOICE_WEIGHTS_0 = (
  0.025,
  0.005,
  0.0,
  0.3,
  0.0,
  0.005,
  0.005,
  0.025,
  0.005,
  0.005,
  0.025,
  0.2,
  0.2,
  0.1,
  0.1,
)


class AugmentOp:
  """timm `AugmentOp`: with probability `prob`, apply `name` at a magnitude.

  The magnitude is N(magnitude, magnitude_std) when magnitude_std > 0 (timm's
  'mstd'), clipped to [0, 10]. Geometric ops fill with `hparams['img_mean']`
  and resample with `hparams['interpolation']` (a filter, or a tuple of
  filters to choose from at random per call, timm's default).
  """

  def __init__(
    self, name: str, prob: float = 0.5, magnitude: float = 10, hparams: dict[str, Any] | None = None
  ):
    if name not in OPS:
      raise ValueError(f"Unknown RandAugment op {name!r}; ops: {sorted(OPS)}.")
    hparams = dict(hparams or _HPARAMS_DEFAULT)
    self.name, self.prob, self.magnitude = name, prob, magnitude
    self.op, self.level_fn, self.geometric = OPS[name]
    self.hparams = hparams
    self.fill = tuple(hparams.get("img_mean", _FILL))
    self.resample = pil_interpolation(hparams.get("interpolation", _RANDOM_INTERPOLATION))
    self.magnitude_std = hparams.get("magnitude_std", 0) or 0

  def sample_magnitude(self, rng: np.random.Generator) -> float:
    magnitude = self.magnitude
    if self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return float(min(_MAX_LEVEL, max(0.0, magnitude)))

  def level_args(self, magnitude: float, rng: np.random.Generator) -> tuple:
    if self.level_fn is None:
      return ()
    return self.level_fn(magnitude, self.hparams, rng)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    if self.prob < 1.0 and rng.random() > self.prob:
      return img
    args = self.level_args(self.sample_magnitude(rng), rng)
    resample = self.resample
    if self.geometric and isinstance(resample, (tuple, list)):
      resample = resample[int(rng.integers(len(resample)))]
    return self.op(img, *args, fill=self.fill, resample=resample)

  def __repr__(self) -> str:
    return f"AugmentOp({self.name}, p={self.prob}, m={self.magnitude}, mstd={self.magnitude_std})"


class RandAugment:
  """timm `RandAugment`: `num_layers` ops drawn with replacement (without
  when weighted), each applied by its own `AugmentOp` (probability 0.5)."""

  def __init__(
    self,
    ops: Sequence[AugmentOp],
    num_layers: int = 2,
    choice_weights: Sequence[float] | None = None,
  ):
    self.ops, self.num_layers = list(ops), num_layers
    self.choice_weights = None if choice_weights is None else np.asarray(choice_weights, np.float64)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    chosen = rng.choice(
      len(self.ops), self.num_layers, replace=self.choice_weights is None, p=self.choice_weights
    )
    for i in chosen:
      img = self.ops[i](img, rng)
    return img

  def __repr__(self) -> str:
    return f"RandAugment(n={self.num_layers}, ops={self.ops})"


def rand_augment_transform(config_str: str, hparams: dict[str, Any] | None = None) -> RandAugment:
  """timm `rand_augment_transform`: 'rand-m9-mstd0.5-inc1' and the like.

  Sections after 'rand': m<int> magnitude (default 10), n<int> ops per image
  (2), mstd<float> magnitude std, inc<int> the 'increasing' op set, w<int>
  op weights (only 0).
  """
  hparams = dict(_HPARAMS_DEFAULT if hparams is None else hparams)
  parts = config_str.split("-")
  if parts[0] != "rand":
    raise ValueError(
      f'auto_augment={config_str!r}: only RandAugment ("rand-...", e.g. '
      f"{DEFAULT_AUTO_AUGMENT!r}) is implemented."
    )
  magnitude, num_layers, weight_idx = _MAX_LEVEL, 2, None
  names = RAND_TRANSFORMS
  for part in parts[1:]:
    pieces = re.split(r"(\d.*)", part)
    if len(pieces) < 2:
      continue
    key, val = pieces[:2]
    try:
      if key == "mstd":
        hparams.setdefault("magnitude_std", float(val))
      elif key == "inc":
        # timm tests bool(val) of the string, true even for 'inc0'; here
        # inc0 selects the standard set.
        if int(val):
          names = RAND_INCREASING_TRANSFORMS
      elif key == "m":
        magnitude = int(val)
      elif key == "n":
        num_layers = int(val)
      elif key == "w":
        weight_idx = int(val)
      else:
        raise ValueError
    except ValueError:
      raise ValueError(
        f"auto_augment={config_str!r}: bad section {part!r} (sections: "
        "m<int>, n<int>, mstd<float>, inc<0|1>, w0)."
      ) from None
  weights = None
  if weight_idx is not None:
    if weight_idx != 0:
      raise ValueError(f"auto_augment={config_str!r}: only weights w0 exist.")
    weights = np.asarray(_RAND_CHOICE_WEIGHTS_0) / sum(_RAND_CHOICE_WEIGHTS_0)
  ops = [AugmentOp(name, prob=0.5, magnitude=magnitude, hparams=hparams) for name in names]
  return RandAugment(ops, num_layers, choice_weights=weights)


# ---------------------------------------------------------------------------
# Random erasing (timm.data.random_erasing, 0.3.2), on normalised HWC arrays
# ---------------------------------------------------------------------------
class RandomErasing:
  """timm `RandomErasing` on one normalised float32 HWC array.

  With probability `probability`, erase `count` rectangles (count uniform in
  [min_count, max_count]), each of area fraction uniform in
  [min_area, max_area] / count and aspect ratio (h / w) log-uniform in
  [min_aspect, max_aspect (default 1 / min_aspect)]; up to ten tries per
  rectangle, one that does not fit strictly inside is redrawn, and after ten
  misfits the rectangle is skipped. Fill: 'const' zeros, 'rand' one N(0, 1)
  colour per rectangle, 'pixel' N(0, 1) per pixel and channel.
  """

  def __init__(
    self,
    probability: float = 0.5,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    mode: str = "const",
    min_count: int = 1,
    max_count: int | None = None,
  ):
    mode = (mode or "const").lower()
    if mode not in RE_MODES:
      raise ValueError(f"Random erasing mode {mode!r} is not one of {RE_MODES}.")
    self.probability, self.min_area, self.max_area = (probability, min_area, max_area)
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
    self.min_count = min_count
    self.max_count = max_count or min_count
    self.mode = mode

  def boxes(
    self, rng: np.random.Generator, img_h: int, img_w: int
  ) -> list[tuple[int, int, int, int]]:
    """The (top, left, h, w) rectangles of one call (random draws only)."""
    if rng.random() > self.probability:
      return []
    area = img_h * img_w
    count = (
      self.min_count
      if self.min_count == self.max_count
      else int(rng.integers(self.min_count, self.max_count + 1))
    )
    boxes = []
    for _ in range(count):
      for _ in range(10):
        target_area = rng.uniform(self.min_area, self.max_area) * area / count
        aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < img_w and h < img_h:
          top = int(rng.integers(0, img_h - h + 1))
          left = int(rng.integers(0, img_w - w + 1))
          boxes.append((top, left, h, w))
          break
    return boxes

  def __call__(self, array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Erases in place (float HWC) and returns `array`."""
    img_h, img_w, chan = array.shape
    for top, left, h, w in self.boxes(rng, img_h, img_w):
      if self.mode == "pixel":
        fill = rng.standard_normal((h, w, chan), dtype=np.float32)
      elif self.mode == "rand":
        fill = rng.standard_normal((1, 1, chan), dtype=np.float32)
      else:
        fill = 0.0
      array[top : top + h, left : left + w, :] = fill
    return array

  def __repr__(self) -> str:
    return (
      f"RandomErasing(p={self.probability}, mode={self.mode}, "
      f"count=({self.min_count}, {self.max_count}))"
    )


# ---------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------
def mae_random_resized_crop_params(
  rng: np.random.Generator,
  width: int,
  height: int,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """MAE `util/crop.RandomResizedCrop.get_params`: (top, left, h, w).

  One draw, no retry loop (as BYOL's TF code): the crop is clipped to the
  image instead of redrawn.
  """
  area = height * width
  target_area = area * rng.uniform(scale[0], scale[1])
  aspect_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
  w = min(int(round(math.sqrt(target_area * aspect_ratio))), width)
  h = min(int(round(math.sqrt(target_area / aspect_ratio))), height)
  # A degenerate empty crop (only for images of a few pixels) would make the
  # resize fail, in torchvision too; keep at least one pixel.
  w, h = max(w, 1), max(h, 1)
  top = int(rng.integers(0, height - h + 1))
  left = int(rng.integers(0, width - w + 1))
  return top, left, h, w


# ---------------------------------------------------------------------------
# The stage-3 recipes: (PIL RGB image, rng) -> {'image': float32 HWC}
# ---------------------------------------------------------------------------
class FinetuneTrain:
  """MAE fine-tuning: timm 0.3.2 `create_transform(is_training=True, ...)`.

  RandomResizedCrop(size, scale, ratio (3/4, 4/3), bicubic) -> horizontal
  flip (0.5) -> RandAugment(`auto_augment`; None or '' to disable; then
  ColorJitter(`color_jitter`) if that is set) -> ToTensor + Normalize ->
  RandomErasing(re_prob, re_mode, count re_count) on the normalised array.
  RandAugment's geometric ops fill with the ImageNet mean as uint8
  (124, 116, 104) and resample with `interpolation` (timm hands
  create_transform's interpolation, 'bicubic' in MAE, on to RandAugment;
  'random' picks bilinear or bicubic per op); the crop is always bicubic.
  """

  def __init__(
    self,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    auto_augment: str | None = DEFAULT_AUTO_AUGMENT,
    interpolation: str = "bicubic",
    color_jitter: float | None = None,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
  ):
    self.size, self.scale = size, tuple(scale)
    self.rand_augment = None
    self.color_jitter = None
    if auto_augment:
      hparams = dict(
        translate_const=int(size * 0.45),
        img_mean=tuple(min(255, round(255 * float(x))) for x in transforms.IMAGENET_MEAN),
      )
      if interpolation and interpolation != "random":
        hparams["interpolation"] = pil_interpolation(interpolation)
      self.rand_augment = rand_augment_transform(auto_augment, hparams)
    elif color_jitter is not None:
      # timm: colour jitter only when there is no auto-augment.
      self.color_jitter = (float(color_jitter),) * 3
    self.random_erasing = (
      RandomErasing(re_prob, mode=re_mode, max_count=re_count) if re_prob > 0 else None
    )

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = transforms.random_resized_crop(image, rng, self.size, self.scale)
    image = transforms.random_horizontal_flip(image, rng)
    if self.rand_augment is not None:
      image = self.rand_augment(image, rng)
    elif self.color_jitter is not None:
      image = transforms.color_jitter(image, rng, *self.color_jitter)
    if self.random_erasing is None:
      return {"image": transforms.to_uint8_array(image)}
    # Random erasing fills in the normalised space (timm): a float image.
    return {"image": self.random_erasing(transforms.to_normalized_array(image), rng)}


class LinprobeTrain:
  """MAE linear probing: MAE's RandomResizedCrop(size, scale, bicubic; one
  draw, see `mae_random_resized_crop_params`) + flip + normalise."""

  def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0)):
    self.size, self.scale = size, tuple(scale)

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> dict[str, np.ndarray]:
    top, left, h, w = mae_random_resized_crop_params(rng, image.width, image.height, self.scale)
    image = image.crop((left, top, left + w, top + h)).resize(
      (self.size, self.size), transforms.BICUBIC
    )
    image = transforms.random_horizontal_flip(image, rng)
    return {"image": transforms.to_uint8_array(image)}
