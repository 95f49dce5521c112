"""Mixup / CutMix on host batches (timm 0.3.2 `Mixup`, mode 'batch'), numpy.

MAE's fine-tuning mixes each GPU's batch with its own flipped copy:

    Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
          switch_prob=0.5, mode='batch', label_smoothing=0.1,
          num_classes=N)(images, labels)

One lam per batch: with probability `prob` the batch is mixed, by CutMix
with probability `switch_prob` (when both alphas are > 0) and lam ~
Beta(cutmix_alpha, cutmix_alpha), else by Mixup with lam ~
Beta(mixup_alpha, mixup_alpha). Mixup: `x = lam * x + (1 - lam) * x[::-1]`.
CutMix: a box from `rand_bbox` (side sqrt(1 - lam) of the image's, centre
uniform, clipped to the image) is pasted from `x[::-1]`, and lam is corrected
to the part of the image left unpasted (`correct_lam`). Targets:
`lam * y + (1 - lam) * y[::-1]`, y the one-hot labels smoothed to
off = smoothing / N, on = 1 - smoothing + off.

Here the batch is the host-local batch the input pipeline yields (see
`input_pipeline`): pairs are formed inside it, as timm pairs inside each
process's batch, and every random draw comes from the generator handed in.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from mimdistill.data.transforms import NORMALIZED

MODES = ("batch",)


def one_hot(
  labels: np.ndarray, num_classes: int, on_value: float = 1.0, off_value: float = 0.0
) -> np.ndarray:
  """float32[B, num_classes]: `on_value` at the labels, else `off_value`."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"Labels {labels.min()}..{labels.max()} do not fit "
      f"num_classes={num_classes}; set config.num_classes."
    )
  out = np.full((labels.size, num_classes), off_value, dtype=np.float32)
  out[np.arange(labels.size), labels] = on_value
  return out


def mixup_target(
  labels: np.ndarray, num_classes: int, lam: float = 1.0, smoothing: float = 0.0
) -> np.ndarray:
  """timm `mixup_target`: smoothed one-hot of `labels` mixed with its flip."""
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  y1 = one_hot(labels, num_classes, on_value, off_value)
  y2 = y1[::-1]
  # float32 throughout, as torch with a Python-float lam.
  return y1 * np.float32(lam) + y2 * np.float32(1.0 - lam)


def rand_bbox(
  img_shape: Sequence[int], lam: float, rng: np.random.Generator, margin: float = 0.0
) -> tuple[int, int, int, int]:
  """timm `rand_bbox` for an image of shape (H, W): (y_lo, y_hi, x_lo, x_hi).

  The box has sides int(H * sqrt(1 - lam)), int(W * sqrt(1 - lam)) around a
  uniform centre, then is clipped to the image (so it may be smaller).
  """
  img_h, img_w = img_shape
  ratio = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
  margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
  cy = int(rng.integers(margin_y, img_h - margin_y))
  cx = int(rng.integers(margin_x, img_w - margin_x))
  yl = int(np.clip(cy - cut_h // 2, 0, img_h))
  yh = int(np.clip(cy + cut_h // 2, 0, img_h))
  xl = int(np.clip(cx - cut_w // 2, 0, img_w))
  xh = int(np.clip(cx + cut_w // 2, 0, img_w))
  return yl, yh, xl, xh


def rand_bbox_minmax(
  img_shape: Sequence[int], minmax: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """timm `rand_bbox_minmax`: sides a uniform fraction in [min, max)."""
  img_h, img_w = img_shape
  cut_h = int(rng.integers(int(img_h * minmax[0]), int(img_h * minmax[1])))
  cut_w = int(rng.integers(int(img_w * minmax[0]), int(img_w * minmax[1])))
  yl = int(rng.integers(0, img_h - cut_h))
  xl = int(rng.integers(0, img_w - cut_w))
  return yl, yl + cut_h, xl, xl + cut_w


def cutmix_bbox_and_lam(
  img_shape: Sequence[int],
  lam: float,
  rng: np.random.Generator,
  ratio_minmax: Sequence[float] | None = None,
  correct_lam: bool = True,
):
  """timm `cutmix_bbox_and_lam`: the box and lam = its complement's share."""
  if ratio_minmax is not None:
    box = rand_bbox_minmax(img_shape, ratio_minmax, rng)
  else:
    box = rand_bbox(img_shape, lam, rng)
  if correct_lam or ratio_minmax is not None:
    yl, yh, xl, xh = box
    lam = 1.0 - (yh - yl) * (xh - xl) / float(img_shape[0] * img_shape[1])
  return box, lam


@dataclasses.dataclass(frozen=True)
class Mixup:
  """timm `Mixup` (mode 'batch') as a pure function of (batch, rng).

  With both alphas 0 and no cutmix_minmax it is inactive: images pass
  unchanged and targets are the smoothed one-hot labels (what MAE's
  LabelSmoothingCrossEntropy uses), so the loss is the same soft-target
  cross-entropy either way.
  """

  num_classes: int
  mixup_alpha: float = 1.0
  cutmix_alpha: float = 0.0
  cutmix_minmax: tuple[float, float] | None = None
  prob: float = 1.0
  switch_prob: float = 0.5
  mode: str = "batch"
  correct_lam: bool = True
  label_smoothing: float = 0.1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"Mixup mode {self.mode!r} is not one of {MODES}.")
    if not isinstance(self.num_classes, int) or self.num_classes <= 0:
      raise ValueError(f"Mixup needs num_classes > 0, got {self.num_classes!r}.")
    for name in ("mixup_alpha", "cutmix_alpha"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
    for name in ("prob", "switch_prob", "label_smoothing"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")
    if self.cutmix_minmax is not None:
      minmax = tuple(float(v) for v in self.cutmix_minmax)
      if len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1:
        raise ValueError(
          f"cutmix_minmax={self.cutmix_minmax!r} must be (min, max) with 0 <= min < max <= 1."
        )
      object.__setattr__(self, "cutmix_minmax", minmax)
      # timm forces cutmix on (alpha 1) when minmax is set.
      object.__setattr__(self, "cutmix_alpha", 1.0)

  @property
  def active(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0

  def params(self, rng: np.random.Generator) -> tuple[float, bool]:
    """timm `_params_per_batch`: (lam, use_cutmix); lam 1 = no mixing."""
    lam, use_cutmix = 1.0, False
    if self.active and rng.random() < self.prob:
      if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
      elif self.mixup_alpha > 0:
        alpha = self.mixup_alpha
      else:
        use_cutmix, alpha = True, self.cutmix_alpha
      lam = float(rng.beta(alpha, alpha))
    return lam, use_cutmix

  def mix(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """(float[B, H, W, C], int[B]) -> (mixed images, float32[B, N], info).

    `info`: {'lam': the final (corrected) lam, 'cutmix': bool, 'box':
    (y_lo, y_hi, x_lo, x_hi) or None}. `images` is not modified.
    """
    if self.active and len(images) % 2:
      # As timm: an odd batch would mix its middle example with itself.
      raise ValueError(f"Mixup/CutMix needs an even batch, got {len(images)}.")
    lam, use_cutmix = self.params(rng)
    box = None
    if lam != 1.0:
      if use_cutmix:
        box, lam = cutmix_bbox_and_lam(
          images.shape[1:3], lam, rng, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
        )
        yl, yh, xl, xh = box
        mixed = images.copy()
        mixed[:, yl:yh, xl:xh] = images[::-1, yl:yh, xl:xh]
      else:
        mixed = images * images.dtype.type(lam) + images[::-1] * images.dtype.type(1.0 - lam)
      images = mixed
    targets = mixup_target(labels, self.num_classes, lam, self.label_smoothing)
    return images, targets, {"lam": float(lam), "cutmix": use_cutmix, "box": box}

  def __call__(
    self, batch: dict[str, np.ndarray], rng: np.random.Generator
  ) -> dict[str, np.ndarray]:
    """A new batch: 'image' mixed, 'label_soft' added, the rest unchanged.

    Mixup blends in the normalised space (timm mixes normalised tensors), so
    with `mixup_alpha > 0` uint8 images are normalised here first, for every
    batch alike (one dtype, one compiled step); CutMix alone pastes uint8
    pixels as they are."""
    images = batch["image"]
    if self.mixup_alpha > 0 and images.dtype == np.uint8:
      images = NORMALIZED[images, np.arange(images.shape[-1])]
    images, targets, _ = self.mix(images, batch["label"], rng)
    return {**batch, "image": images, "label_soft": targets}
