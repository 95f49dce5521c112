"""Segmentation evaluation over padded, masked eval batches: mmseg's
`slide_inference` / `whole_inference`, the resize to the original shape
and the mIoU areas, in one jitted function of static shapes.

The eval pipeline (`data.segmentation_transforms.SegmentationPreprocess`)
gives every example on one canvas: the keep-ratio resized image padded to
`(Hs, Ws)` (portrait images stored transposed, `transposed = 1`), its
`img_shape` and `ori_shape`, the original-size label padded with 255 to
`(Lh, Lw)`, and `mask` (0 for padding examples). Per example, in the
stored orientation:

  * windows exactly as `segmentation_inference.slide_windows` computes them
    from the example's own resized size (grids `max(h - crop + stride - 1,
    0) // stride + 1`, the last window shifted back inside), enumerated up
    to the canvas's largest count and masked beyond the example's own, so
    the shapes do not depend on the example; 'whole' is one window at the
    origin (every resized image must fit in the crop);
  * each window is transposed back before the model sees it and its
    logits (decode logits resized to the crop, `encode_decode`) are
    transposed again, summed into the canvas and divided by the per-pixel
    window count (`count_mat`);
  * the averaged logits of the `(h, w)` region are resized to the original
    `(oh, ow)` with torch's bilinear taps (`models.resize.linear_taps`,
    computed in-graph from the example's sizes) and argmaxed;
  * `segmentation_metrics.batch_areas` with the example mask: padded pixels
    carry label 255 and padding examples count nothing, so the areas
    summed over the split count every pixel of every example once, on any
    mesh (the sums are global under jit).

Where this differs from mmseg: an image smaller than the crop along an
axis is zero-padded to the crop there (mmseg would run the backbone at the
smaller size, which a fixed-size position embedding and relative-position
table cannot); 'whole' runs the crop-sized canvas (zero-padded) for the
same reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.training import segmentation_metrics as seg_metrics

PyTree = Any
MODES = ("slide", "whole")


def grids(size, crop: int, stride):
  """mmseg's window count along one axis (ints or int arrays)."""
  return jnp.maximum(size - crop + stride - 1, 0) // stride + 1


def max_windows(canvas: tuple[int, int], crop: int, stride: tuple[int, int], mode: str) -> int:
  """Windows to enumerate per example: the most any example of a canvas
  `(Hs, Ws)` (short, long) can need, either orientation's stride."""
  if mode == "whole":
    return 1
  hs, ws = canvas
  a = int(grids(hs, crop, stride[0]) * grids(ws, crop, stride[1]))
  b = int(grids(hs, crop, stride[1]) * grids(ws, crop, stride[0]))
  return max(a, b)


def _taps(in_size, out_size, out_len: int):
  """`linear_taps` with traced sizes: `(i0, i1, w1)` for `out_len` rows
  (rows beyond `out_size` are computed but never scored)."""
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  src = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * scale - 0.5
  src = jnp.maximum(src, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  return i0, i1, src - i0.astype(jnp.float32)


def _resize_one(x, in_hw, out_hw, out_shape: tuple[int, int]):
  """`(H, W, K)` canvas, its valid `(h, w)` -> `(Lh, Lw, K)` with the
  valid `(oh, ow)` region resized as `resize_bilinear` (width first)."""
  i0, i1, w1 = _taps(in_hw[1], out_hw[1], out_shape[1])
  w1 = w1[None, :, None].astype(x.dtype)
  x = (1 - w1) * jnp.take(x, i0, axis=1) + w1 * jnp.take(x, i1, axis=1)
  i0, i1, w1 = _taps(in_hw[0], out_hw[0], out_shape[0])
  w1 = w1[:, None, None].astype(x.dtype)
  return (1 - w1) * jnp.take(x, i0, axis=0) + w1 * jnp.take(x, i1, axis=0)


def _stored(shape, transposed):
  """(h, w) in the stored orientation of `(B, 2)` sizes."""
  h, w = shape[:, 0], shape[:, 1]
  return jnp.where(transposed > 0, w, h), jnp.where(transposed > 0, h, w)


def _maybe_t(x, flag):
  """`x` (a batch of HWC arrays) with H and W swapped where `flag`."""
  return jnp.where(flag.reshape((-1,) + (1,) * (x.ndim - 1)) > 0, jnp.swapaxes(x, 1, 2), x)


def canvas_logits(
  logits_fn: Callable[[jax.Array], jax.Array],
  batch: dict,
  *,
  crop: int,
  stride: tuple[int, int],
  windows: int,
  mode: str = "slide",
):
  """`(B, Hs', Ws', K)` averaged window logits in the stored orientation
  (`Hs' = max(Hs, crop)`), and the stored `(h, w)`."""
  images = batch["image"]
  b, hs, ws, _ = images.shape
  pad_h, pad_w = max(crop - hs, 0), max(crop - ws, 0)
  if pad_h or pad_w:
    images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  transposed = batch["transposed"]
  h, w = _stored(batch["img_shape"], transposed)
  if mode == "whole":
    starts = [(jnp.zeros_like(h), jnp.zeros_like(w), jnp.ones_like(h, dtype=bool))]
  else:
    sh = jnp.where(transposed > 0, stride[1], stride[0])
    sw = jnp.where(transposed > 0, stride[0], stride[1])
    w_grids = grids(w, crop, sw)
    n = grids(h, crop, sh) * w_grids
    starts = []
    for k in range(windows):
      i, j = k // w_grids, k % w_grids
      y2, x2 = jnp.minimum(i * sh + crop, h), jnp.minimum(j * sw + crop, w)
      starts.append((jnp.maximum(y2 - crop, 0), jnp.maximum(x2 - crop, 0), k < n))
  cut = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (crop, crop, im.shape[-1])))
  crops = jnp.concatenate([_maybe_t(cut(images, y, x), transposed) for y, x, _ in starts])
  logits = logits_fn(crops).astype(jnp.float32)
  logits = logits.reshape(len(starts), b, crop, crop, logits.shape[-1])
  total = jnp.zeros(images.shape[:3] + (logits.shape[-1],), jnp.float32)
  count = jnp.zeros(images.shape[:3] + (1,), jnp.float32)
  add = jax.vmap(
    lambda t, v, y, x: jax.lax.dynamic_update_slice(
      t, jax.lax.dynamic_slice(t, (y, x, 0), v.shape) + v, (y, x, 0)
    )
  )
  for k, (y, x, valid) in enumerate(starts):
    weight = valid.astype(jnp.float32)[:, None, None, None]
    total = add(total, _maybe_t(logits[k], transposed) * weight, y, x)
    count = add(count, jnp.broadcast_to(weight, (b, crop, crop, 1)), y, x)
  return total / jnp.maximum(count, 1.0), (h, w)


def original_size_logits(
  logits_fn, batch: dict, *, crop: int, stride, windows: int, mode: str = "slide"
) -> jax.Array:
  """`(B, Lh, Lw, K)` float32 logits at the original size (stored
  orientation, padded like the labels)."""
  logits, (h, w) = canvas_logits(
    logits_fn, batch, crop=crop, stride=stride, windows=windows, mode=mode
  )
  oh, ow = _stored(batch["ori_shape"], batch["transposed"])
  # Padding examples have zero sizes; any positive size keeps the taps finite.
  h, w = jnp.maximum(h, 1), jnp.maximum(w, 1)
  oh, ow = jnp.maximum(oh, 1), jnp.maximum(ow, 1)
  out_shape = batch["label"].shape[1:3]
  return jax.vmap(lambda x, a, b, c, d: _resize_one(x, (a, b), (c, d), out_shape))(
    logits, h, w, oh, ow
  )


def predict_batch(
  logits_fn, batch: dict, *, crop: int, stride, windows: int, mode: str = "slide"
) -> jax.Array:
  """`(B, Lh, Lw)` int32 predictions at the original size (stored
  orientation, padded like the labels)."""
  logits = original_size_logits(
    logits_fn, batch, crop=crop, stride=stride, windows=windows, mode=mode
  )
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class SegmentationEvaluator:
  """`evaluator(variables) -> {'mIoU', 'mAcc', 'aAcc' (percent), 'count'}`
  over one pass of `eval_data`; `evaluator.last` keeps the full mmseg
  metrics of the latest pass (per-class IoU and Acc, fractions) and its
  summed areas. `predict(variables, batch)` returns the predictions of one
  batch with the same compiled function."""

  apply_fn: Callable[[PyTree, jax.Array], jax.Array]  # (variables, crops) -> crop logits
  eval_data: Any
  num_classes: int
  crop: int
  stride: tuple[int, int]
  windows: int
  mode: str = "slide"
  last: dict | None = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"eval mode {self.mode!r}; use one of {MODES}")

    def step(variables, batch):
      pred = predict_batch(
        lambda x: self.apply_fn(variables, x),
        batch,
        crop=self.crop,
        stride=tuple(self.stride),
        windows=self.windows,
        mode=self.mode,
      )
      areas = seg_metrics.batch_areas(pred, batch["label"], self.num_classes, mask=batch["mask"])
      return {"areas": areas, "count": jnp.sum(batch["mask"])}, pred

    # One compiled program for every batch (and `predict`); the per-batch
    # sums are added outside it, so no carried input changes its placement.
    self._step = jax.jit(step)

  def predict(self, variables, batch) -> jax.Array:
    return self._step(variables, batch)[1]

  def __call__(self, variables) -> dict[str, float]:
    acc = None
    for batch in iter(self.eval_data):
      sums, _ = self._step(variables, batch)
      acc = sums if acc is None else jax.tree_util.tree_map(jnp.add, acc, sums)
    if acc is None:
      raise ValueError("the eval split yielded no batches")
    acc = jax.device_get(acc)
    areas = np.asarray(acc["areas"], np.int64)
    full = seg_metrics.metrics_from_areas(areas)
    self.last = {**full, "areas": areas}
    out = {k: float(full[k]) * 100.0 for k in ("mIoU", "mAcc", "aAcc")}
    out["labelled_pixels"] = float(areas[3].sum())
    out["count"] = float(acc["count"])
    return out
