"""Stage 4's `predictions.png`: rows of image / ground truth / prediction,
the class maps drawn with one fixed palette (`palette`), and a legend of
the classes that appear.

The palette is the PASCAL VOC colour map (the bits of the class index
spread over R, G and B, the scheme mmseg's and most tools' label maps
use), so a class has the same colour in every picture of every run; the
ignore index 255 is drawn white (class 0 is VOC's black).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from mimdistill.visualize import new_figure, save_figure

IGNORE_INDEX = 255


def palette(n: int = 256) -> np.ndarray:
  """`(n, 3)` uint8: the VOC colour of each class index (255 -> white)."""
  colors = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    colors[i] = (r, g, b)
  if n > IGNORE_INDEX:
    colors[IGNORE_INDEX] = 255
  return colors


def colorize(label: np.ndarray) -> np.ndarray:
  """`(H, W)` class indices -> `(H, W, 3)` uint8 colours."""
  return palette()[np.clip(np.asarray(label), 0, 255).astype(np.int64)]


def plot_predictions(
  images: Sequence[np.ndarray],
  labels: Sequence[np.ndarray],
  predictions: Sequence[np.ndarray],
  class_names: Sequence[str],
  path: str | os.PathLike,
  *,
  title: str | None = None,
) -> epath.Path:
  """One row per example: the (resized) uint8 image, its ground truth and
  the prediction at the original size; a legend of the classes shown."""
  n = len(images)
  if not n:
    raise ValueError("plot_predictions needs at least one example")
  fig = new_figure(7.5, 2.4 * n + 0.9)
  axes = fig.subplots(n, 3, squeeze=False)
  for i in range(n):
    acc = np.mean(
      (np.asarray(predictions[i]) == np.asarray(labels[i]))[np.asarray(labels[i]) != IGNORE_INDEX]
    )
    for ax, shown, caption in (
      (axes[i, 0], images[i], "image"),
      (axes[i, 1], colorize(labels[i]), "ground truth"),
      (axes[i, 2], colorize(predictions[i]), f"prediction (pixel acc {acc:.0%})"),
    ):
      ax.imshow(shown, interpolation="nearest")
      ax.set_axis_off()
      if i == 0 or caption.startswith("prediction"):
        ax.set_title(caption, fontsize=8)
  present = sorted(
    set(np.unique(np.concatenate([np.ravel(x) for x in (*labels, *predictions)]).tolist()))
    - {IGNORE_INDEX}
  )
  colors = palette()
  from matplotlib.patches import Patch

  handles = [
    Patch(color=colors[c] / 255.0, label=class_names[c] if c < len(class_names) else str(c))
    for c in present
  ]
  fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  height = 2.4 * n + 0.9
  fig.subplots_adjust(bottom=0.9 / height + 0.02, top=1 - 0.45 / height, hspace=0.25)
  return save_figure(fig, path)
