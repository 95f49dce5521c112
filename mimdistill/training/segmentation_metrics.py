"""mIoU evaluation as mmseg computes it (0.11 `eval_metrics` / 1.x
`IoUMetric`), with the per-class areas accumulated on device.

Per image, pixels whose label is `ignore_index` (255) are dropped from
both prediction and label, then per-class histograms: `intersect` (pred ==
label), `pred`, `label`, and `union = pred + label - intersect`. Areas are
summed over the dataset before any ratio (not averaged per image):

    IoU = intersect / union,  Acc = intersect / label  (per class; 0/0 -> NaN:
          a class absent from the labels has Acc NaN, and IoU NaN only if it
          is never predicted either, else 0),
    aAcc = sum(intersect) / sum(label),  mIoU, mAcc = nanmean.

`batch_areas` is jittable and works on padded eval batches: `mask` (B,)
marks real examples (padding examples count nothing), and padded pixels of
a real example carry label 255. Under jit with a sharded batch the sums are
global, so every pixel of every example is counted once on any mesh. Areas
are int32 (exact to 2^31 pixels per class and area); `accumulate` adds a
batch on device, and the host converts the totals to int64 / float64.

`reduce_zero_label` (ADE20K's annotation mapping, `data.segmentation_labels`)
is applied when loading, as mmseg 1.x does.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.data.segmentation_labels import IGNORE_INDEX, reduce_zero_label

AREAS = ("intersect", "union", "pred", "label")
__all__ = [
  "AREAS",
  "accumulate",
  "batch_areas",
  "metrics_from_areas",
  "reduce_zero_label",
  "reported",
]


def batch_areas(
  pred: jax.Array,
  label: jax.Array,
  num_classes: int,
  *,
  mask: jax.Array | None = None,
  ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
  """`(4, K)` int32 areas (intersect, union, pred, label) of `(B, H, W)`
  integer predictions and labels; `mask` `(B,)` drops padding examples.
  Labels outside [0, K) other than `ignore_index` are not counted in any
  class (mmseg's `histc` over [0, K - 1]); the data pipeline refuses them."""
  valid = label != ignore_index
  if mask is not None:
    valid = valid & (mask.reshape((-1,) + (1,) * (label.ndim - 1)) > 0)
  k = num_classes
  # Out-of-range values and dropped pixels go to bin k, which is cut off.
  lab = jnp.where(valid & (label >= 0) & (label < k), label, k).astype(jnp.int32)
  prd = jnp.where(valid & (pred >= 0) & (pred < k), pred, k).astype(jnp.int32)
  hits = jnp.where(prd == lab, lab, k)
  count = lambda x: jnp.bincount(x.reshape(-1), length=k + 1)[:k].astype(jnp.int32)
  inter, area_pred, area_label = count(hits), count(prd), count(lab)
  return jnp.stack([inter, area_pred + area_label - inter, area_pred, area_label])


def accumulate(total: jax.Array | None, areas: jax.Array) -> jax.Array:
  return areas if total is None else total + areas


@contextlib.contextmanager
def _quiet():
  """0/0 (absent classes) and the nanmean of all-NaN are expected here."""
  with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    yield


def metrics_from_areas(areas) -> dict[str, np.ndarray]:
  """mmseg's metrics from `(4, K)` summed areas, in float64 (fractions)."""
  a = np.asarray(areas, np.float64)
  inter, union, _, label = a
  with _quiet():
    iou, acc, aacc = inter / union, inter / label, inter.sum() / label.sum()
    miou, macc = np.nanmean(iou), np.nanmean(acc)
  return {"aAcc": np.float64(aacc), "IoU": iou, "Acc": acc, "mIoU": miou, "mAcc": macc}


def reported(areas, style: str = "mmseg1x") -> dict[str, float]:
  """The summary numbers as mmseg prints them: 'mmseg1x' (IoUMetric:
  percent rounded to 2 decimals, computed in float32) or 'mmseg011'
  (CustomDataset.evaluate: the percent rounded to 2 decimals, / 100)."""
  if style == "mmseg011":
    m = metrics_from_areas(areas)
    return {k: float(np.round(m[k] * 100, 2) / 100) for k in ("aAcc", "mIoU", "mAcc")}
  if style != "mmseg1x":
    raise ValueError(f"style={style!r}; use 'mmseg1x' or 'mmseg011'")
  a = np.asarray(areas, np.float64).astype(np.float32)
  inter, union, _, label = a
  with _quiet():
    values = {
      "aAcc": inter.sum() / label.sum(),
      "mIoU": np.nanmean(inter / union),
      "mAcc": np.nanmean(inter / label),
    }
  return {k: float(np.round(np.float32(v) * np.float32(100), 2)) for k, v in values.items()}
