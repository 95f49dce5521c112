"""mmseg's ADE20K pipelines (TinyMIM's `configs/_base_/datasets/ade20k.py`)
as numpy transforms of one example, with every random draw from an explicit
`np.random.Generator` (the input pipeline seeds one per example).

Train (`train_transform`), in mmseg's order, on the uint8 image as loaded:
  1. `Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))`: ratio =
     U[0.5, 2.0), scale = (int(2048 r), int(512 r)), keep-ratio rescale
     factor `min(long / max(h, w), short / min(h, w))`, new size
     `int(w f + 0.5), int(h f + 0.5)`; image bilinear, label nearest, with
     OpenCV's semantics (`data.cv2_ops`: no antialias);
  2. `RandomCrop(512, cat_max_ratio=0.75)`: offsets U{0..margin}; up to 10
     re-draws until the crop has >1 class (255 excluded) and none over 75%;
  3. `RandomFlip(0.5)` horizontal;
  4. `PhotoMetricDistortion`: brightness (p 0.5, +U(-32, 32)), contrast
     first or last (mode p 0.5; p 0.5, x U(0.5, 1.5)), saturation (p 0.5,
     HSV S x U(0.5, 1.5)), hue (p 0.5, H + U{-18..17} mod 180), each
     clipped to uint8; mmseg does it on the BGR image cv2 loads, and so does
     this (the image is RGB here; it is flipped to BGR for the HSV steps);
  5. `Normalize` (mean 123.675/116.28/103.53, std 58.395/57.12/57.375, RGB);
  6. `Pad` to the crop size at the bottom/right: image 0, label 255.
Eval (`eval_transform`): keep-ratio resize to (2048, 512), normalise; the
label keeps its original size (mmseg scores at the original resolution).

Labels: `reduce_zero_label` (ADE20K: 0 -> 255, v -> v - 1) when loading;
any value >= num_classes other than 255 is an error naming the values.
Sizes are configurable; the defaults are TinyMIM's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mimdistill.data import cv2_ops
from mimdistill.data.segmentation_labels import (
  IGNORE_INDEX,
  check_labels,
  decode_annotation,
  reduce_zero_label,
)
from mimdistill.data.sources import decode_image

ADE_MEAN = (123.675, 116.28, 103.53)
ADE_STD = (58.395, 57.12, 57.375)


def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
  """mmcv `rescale_size` (keep ratio): the new (h, w) for `scale` = (long, short)."""
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(h, w), short_edge / min(h, w))
  return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def rescale(image: np.ndarray, label: np.ndarray | None, scale: Sequence[int]):
  """mmcv `imrescale` of image (bilinear) and label (nearest)."""
  nh, nw = rescale_size(image.shape[0], image.shape[1], scale)
  image = cv2_ops.resize_linear(image, (nw, nh))
  if label is not None:
    label = cv2_ops.resize_nearest(label, (nw, nh))
  return image, label


def random_crop(
  image: np.ndarray,
  label: np.ndarray,
  crop: Sequence[int],
  rng: np.random.Generator,
  cat_max_ratio: float = 0.75,
):
  """mmseg `RandomCrop`: slices clipped at the border (a smaller image
  gives a smaller crop, padded later)."""

  def bbox():
    margin_h = max(image.shape[0] - crop[0], 0)
    margin_w = max(image.shape[1] - crop[1], 0)
    y = int(rng.integers(0, margin_h + 1))
    x = int(rng.integers(0, margin_w + 1))
    return y, y + crop[0], x, x + crop[1]

  y1, y2, x1, x2 = bbox()
  if cat_max_ratio < 1.0:
    for _ in range(10):
      labels, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
      counts = counts[labels != IGNORE_INDEX]
      if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
        break
      y1, y2, x1, x2 = bbox()
  return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
  image_rgb: np.ndarray,
  rng: np.random.Generator,
  *,
  brightness_delta: int = 32,
  contrast_range: Sequence[float] = (0.5, 1.5),
  saturation_range: Sequence[float] = (0.5, 1.5),
  hue_delta: int = 18,
) -> np.ndarray:
  """mmseg `PhotoMetricDistortion` (same draws, same order) on uint8 RGB."""
  img = np.ascontiguousarray(image_rgb[..., ::-1])  # BGR, as mmseg sees it

  def contrast(x):
    if rng.integers(2):
      return _convert(x, alpha=rng.uniform(contrast_range[0], contrast_range[1]))
    return x

  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)
  if mode == 1:
    img = contrast(img)
  if rng.integers(2):
    hsv = cv2_ops.bgr_to_hsv(img)
    alpha = rng.uniform(saturation_range[0], saturation_range[1])
    hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)
    img = cv2_ops.hsv_to_bgr(hsv)
  if rng.integers(2):
    hsv = cv2_ops.bgr_to_hsv(img)
    delta = int(rng.integers(-hue_delta, hue_delta))
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
    img = cv2_ops.hsv_to_bgr(hsv)
  if mode == 0:
    img = contrast(img)
  return np.ascontiguousarray(img[..., ::-1])


def normalize(image: np.ndarray, mean=ADE_MEAN, std=ADE_STD) -> np.ndarray:
  """mmcv `imnormalize` (to_rgb: the image is already RGB): float32."""
  mean = np.asarray(mean, np.float32)
  stdinv = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
  return (image.astype(np.float32) - mean) * stdinv


def pad_to(image: np.ndarray, label: np.ndarray | None, size: Sequence[int]):
  """mmcv `impad(shape=size)`: bottom/right padding, image 0, label 255."""
  h, w = image.shape[:2]
  if h > size[0] or w > size[1]:
    raise ValueError(f"image {h}x{w} is larger than the pad size {tuple(size)}")
  out = np.zeros((size[0], size[1]) + image.shape[2:], image.dtype)
  out[:h, :w] = image
  if label is None:
    return out, None
  lab = np.full((size[0], size[1]), IGNORE_INDEX, label.dtype)
  lab[: label.shape[0], : label.shape[1]] = label
  return out, lab


@dataclasses.dataclass(frozen=True)
class SegmentationAugment:
  """Settings of the train / eval transforms (TinyMIM's ADE20K defaults)."""

  num_classes: int = 150
  crop_size: tuple[int, int] = (512, 512)
  img_scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True
  reduce_zero_label: bool = False
  mean: tuple[float, float, float] = ADE_MEAN
  std: tuple[float, float, float] = ADE_STD

  def __post_init__(self):
    # numpy would sample a reversed ratio range, and a cat_max_ratio of 0
    # rejects every crop, without a word: refused here, named by field.
    lo, hi = self.ratio_range
    if not 0 < lo <= hi:
      raise ValueError(
        f"data.ratio_range={self.ratio_range} must be (low, high) with 0 < low <= high: the "
        "random rescale's range (mmseg: (0.5, 2.0))"
      )
    if len(self.img_scale) != 2 or min(self.img_scale) < 1:
      raise ValueError(f"data.img_scale={self.img_scale} must be two positive ints (long, short)")
    if not 0 < self.cat_max_ratio <= 1:
      raise ValueError(
        f"data.cat_max_ratio={self.cat_max_ratio:g} must be in (0, 1]: the largest share one "
        "class may have of a crop (1 disables the check; mmseg: 0.75)"
      )
    if not 0 <= self.flip_prob <= 1:
      raise ValueError(f"data.flip_prob={self.flip_prob:g} must be in [0, 1]")
    for name in ("mean", "std"):
      values = getattr(self, name)
      if len(values) != 3 or not all(np.isfinite(values)):
        raise ValueError(f"data.{name}={values} must be 3 finite numbers (R, G, B; 0-255 scale)")
    if min(self.std) <= 0:
      raise ValueError(f"data.std={self.std} must be positive (per channel, 0-255 scale)")

  def load_label(self, label: np.ndarray, what: str = "annotation") -> np.ndarray:
    label = np.asarray(label)
    if label.ndim == 3:
      label = label[..., 0]
    if self.reduce_zero_label:
      label = reduce_zero_label(label)
    check_labels(label, self.num_classes, what)
    return label

  def train(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict:
    """uint8 RGB image + uint8 label (as loaded) -> `{'image': f32[crop,
    crop, 3], 'label': i32[crop, crop]}`."""
    label = self.load_label(label)
    lo, hi = self.ratio_range
    ratio = rng.random() * (hi - lo) + lo
    scale = (int(self.img_scale[0] * ratio), int(self.img_scale[1] * ratio))
    image, label = rescale(np.asarray(image, np.uint8), label, scale)
    image, label = random_crop(image, label, self.crop_size, rng, self.cat_max_ratio)
    if rng.random() < self.flip_prob:
      image, label = image[:, ::-1], label[:, ::-1]
    if self.photometric:
      image = photometric_distortion(image, rng)
    image, label = pad_to(normalize(image, self.mean, self.std), label, self.crop_size)
    return {"image": image, "label": label.astype(np.int32)}

  def eval(self, image: np.ndarray, label: np.ndarray | None = None) -> dict:
    """Keep-ratio resize to `img_scale`, normalise; the label (if any) at
    its original size; `ori_shape` is the original (h, w)."""
    image = np.asarray(image, np.uint8)
    out = {"ori_shape": np.asarray(image.shape[:2], np.int32)}
    resized, _ = rescale(image, None, self.img_scale)
    out["image"] = normalize(resized, self.mean, self.std)
    if label is not None:
      out["label"] = self.load_label(label).astype(np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class SegmentationPreprocess:
  """(stream position, record) -> example, for the input pipeline's map
  step (picklable for worker processes), like `input_pipeline._Preprocess`:
  the rng of an example is `default_rng(SeedSequence([seed, index]))`.

  Train: `{'image': f32[crop, crop, 3], 'label': i32[crop, crop]}`.
  Eval: the keep-ratio resized image padded (bottom/right, 0) to
  `eval_image_size`, the original-size label padded with 255 to
  `eval_label_size`, `img_shape` / `ori_shape` (the unpadded (h, w)),
  `transposed` and `mask` (0 for the pipeline's padding records `{}`,
  whose label is all 255), so a padded, masked eval batch counts every
  pixel once.

  Both eval sizes are (short side, long side): a portrait image (resized
  height > width) is stored transposed, image and label alike, with
  `transposed = 1`, so one landscape canvas holds every image (ADE20K at
  (2048, 512): 512 x 2048, not 2048 x 2048). `img_shape` / `ori_shape`
  stay the untransposed sizes; the evaluator transposes each window back
  before the model sees it, and pixel counts do not care.
  """

  augment: SegmentationAugment
  train: bool
  seed: int = 0
  eval_image_size: tuple[int, int] | None = None
  eval_label_size: tuple[int, int] | None = None
  image_key: str = "image"
  label_key: str = "annotation"

  def __call__(self, index: int, record) -> dict[str, np.ndarray]:
    if self.train:
      rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
      image = np.asarray(decode_image(record[self.image_key]))
      label = decode_annotation(record[self.label_key])
      return self.augment.train(image, label, rng)
    if self.eval_image_size is None or self.eval_label_size is None:
      raise ValueError("eval preprocessing needs eval_image_size and eval_label_size")
    if not record:  # the pipeline's padding record
      h, w = self.eval_image_size
      lh, lw = self.eval_label_size
      return {
        "image": np.zeros((h, w, 3), np.float32),
        "label": np.full((lh, lw), IGNORE_INDEX, np.int32),
        "img_shape": np.zeros(2, np.int32),
        "ori_shape": np.zeros(2, np.int32),
        "transposed": np.int32(0),
        "mask": np.float32(0.0),
      }
    image = np.asarray(decode_image(record[self.image_key]))
    label = decode_annotation(record[self.label_key])
    example = self.augment.eval(image, label)
    img_shape = np.asarray(example["image"].shape[:2], np.int32)
    resized, label = example["image"], example["label"]
    transposed = bool(img_shape[0] > img_shape[1])
    if transposed:
      resized, label = resized.transpose(1, 0, 2), label.T
    for what, size, shape, field in (
      ("resized image", self.eval_image_size, resized.shape, "eval_pad_size"),
      ("annotation", self.eval_label_size, label.shape, "eval_label_pad_size"),
    ):
      if shape[0] > size[0] or shape[1] > size[1]:
        raise ValueError(
          f"eval example {index}: the {what} is {shape[0]}x{shape[1]} (short x long side), "
          f"larger than data.{field}={tuple(size)}; raise it (or leave it unset: the "
          "stage then measures the split)"
        )
    image, _ = pad_to(resized, None, self.eval_image_size)
    _, label = pad_to(np.zeros(label.shape + (1,), np.uint8), label, self.eval_label_size)
    return {
      "image": image,
      "label": label.astype(np.int32),
      "img_shape": img_shape,
      "ori_shape": example["ori_shape"],
      "transposed": np.int32(transposed),
      "mask": np.float32(1.0),
    }


def _field(config, key: str, default):
  value = config.get(key, default)
  return default if value is None else value


def augment_from_config(config) -> SegmentationAugment:
  """The transforms' settings from a data config: `num_classes`,
  `image_size` (the crop), `img_scale`, `ratio_range`, `cat_max_ratio`,
  `flip_prob`, `photometric`, `reduce_zero_label`, `mean`, `std` (each
  optional but `num_classes` and `image_size`; defaults are TinyMIM's)."""
  d = SegmentationAugment
  crop = int(config.get("image_size"))
  num_classes = config.get("num_classes")
  if not num_classes:
    raise ValueError("segmentation data needs num_classes (150 for ADE20K); set it in the config")
  return SegmentationAugment(
    num_classes=int(num_classes),
    crop_size=(crop, crop),
    img_scale=tuple(int(v) for v in _field(config, "img_scale", d.img_scale)),
    ratio_range=tuple(float(v) for v in _field(config, "ratio_range", d.ratio_range)),
    cat_max_ratio=float(_field(config, "cat_max_ratio", d.cat_max_ratio)),
    flip_prob=float(_field(config, "flip_prob", d.flip_prob)),
    photometric=bool(_field(config, "photometric", d.photometric)),
    reduce_zero_label=bool(_field(config, "reduce_zero_label", d.reduce_zero_label)),
    mean=tuple(float(v) for v in _field(config, "mean", d.mean)),
    std=tuple(float(v) for v in _field(config, "std", d.std)),
  )


def preprocess_from_config(config, *, train: bool, seed: int) -> SegmentationPreprocess:
  """The input pipeline's map step for augment 'segment' (train) or
  'segment_eval' from a data config (see `augment_from_config`; eval also
  needs `eval_pad_size` and `eval_label_pad_size`, (short, long) sides,
  which the stage measures on the split when unset)."""
  pad = config.get("eval_pad_size")
  label_pad = config.get("eval_label_pad_size")
  if not train and (not pad or not label_pad):
    raise ValueError(
      "segmentation eval batches need data.eval_pad_size and data.eval_label_pad_size "
      "((short, long) sides; the segment stage measures them on the split when unset)"
    )
  return SegmentationPreprocess(
    augment_from_config(config),
    train=train,
    seed=int(seed),
    eval_image_size=None if train else (int(pad[0]), int(pad[1])),
    eval_label_size=None if train else (int(label_pad[0]), int(label_pad[1])),
    image_key=config.get("image_key") or "image",
    label_key=config.get("label_key") or "annotation",
  )
