"""Segmentation inference as mmseg's `EncoderDecoder` does it, as pure
functions of an apply function (`logits_fn(images) -> NHWC logits at the
images' size`, e.g. `lambda x: model.apply(variables, x,
method=model.encode_decode)`).

  * `slide_windows`: mmseg `slide_inference`'s crops: `grids = max(H - crop
    + stride - 1, 0) // stride + 1` per axis, `y1 = i * stride`, `y2 =
    min(y1 + crop, H)`, `y1 = max(y2 - crop, 0)` (the last window shifted
    back inside the image), row-major over (h_idx, w_idx).
  * `slide_inference`: each crop's logits (already resized to the crop by
    `encode_decode`) zero-padded to the image and summed, divided by how
    many windows cover each pixel (`count_mat`); the crops run as one batch
    (eval-mode BatchNorm uses running statistics, so batching the windows
    changes nothing).
  * `whole_inference`: the logits of the whole image.
  * `resize_to`: logits resized to the original shape (bilinear,
    align_corners=False): mmseg 0.11's `rescale=True` / 1.x's
    `postprocess_result`; its argmax is the prediction (mmseg 0.11 takes a
    softmax first, which keeps the argmax).

The backbone has a fixed-size position embedding and relative position
table, so crops must have the backbone's input size, as in TinyMIM (crop
512, stride 341); an image smaller than the crop is refused (the official
code would fail on it too).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models.resize import resize_bilinear

LogitsFn = Callable[[jax.Array], jax.Array]


def slide_windows(
  height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
  """`[(y1, y2, x1, x2), ...]` of mmseg's sliding-window inference."""
  h_crop, w_crop = crop
  h_stride, w_stride = stride
  if h_stride <= 0 or w_stride <= 0:
    raise ValueError(f"slide stride {stride} must be positive")
  if height < h_crop or width < w_crop:
    raise ValueError(
      f"image {height}x{width} is smaller than the slide crop {h_crop}x{w_crop}; the backbone "
      "takes crops of its own input size only: resize the image (eval keeps the ratio) or "
      "use a smaller crop"
    )
  h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
  windows = []
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y2 = min(h_idx * h_stride + h_crop, height)
      x2 = min(w_idx * w_stride + w_crop, width)
      windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
  return windows


def count_matrix(height: int, width: int, windows) -> np.ndarray:
  """`(H, W)` float32: how many windows cover each pixel."""
  count = np.zeros((height, width), np.float32)
  for y1, y2, x1, x2 in windows:
    count[y1:y2, x1:x2] += 1
  return count


def slide_inference(
  logits_fn: LogitsFn,
  images: jax.Array,
  crop: tuple[int, int],
  stride: tuple[int, int],
  *,
  return_crops: bool = False,
):
  """`(B, H, W, K)` averaged window logits of NHWC `images` (and, with
  `return_crops`, the per-window logits `(n_windows, B, h, w, K)`)."""
  b, height, width, _ = images.shape
  windows = slide_windows(height, width, tuple(crop), tuple(stride))
  crops = jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
  crop_logits = logits_fn(crops)
  crop_logits = crop_logits.reshape(len(windows), b, *crop_logits.shape[1:])
  total = jnp.zeros((b, height, width, crop_logits.shape[-1]), crop_logits.dtype)
  for j, (y1, y2, x1, x2) in enumerate(windows):
    total = total.at[:, y1:y2, x1:x2].add(crop_logits[j])
  count = jnp.asarray(count_matrix(height, width, windows), total.dtype)
  logits = total / count[None, :, :, None]
  return (logits, crop_logits) if return_crops else logits


def whole_inference(logits_fn: LogitsFn, images: jax.Array) -> jax.Array:
  return logits_fn(images)


def resize_to(logits: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Logits resized to the original image shape `(H, W)`."""
  return resize_bilinear(logits, tuple(shape))


def predict(logits: jax.Array) -> jax.Array:
  """Per-pixel class indices `(B, H, W)` int32."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
