"""Confusion matrix on the eval split (stage 3's `confusion_matrix.png`).

The counts come from the stage's evaluation pass itself
(`training.evaluate.Evaluator`, every real example counted once whatever the
devices or hosts); `plot_confusion_matrix` draws them with the class names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from mimdistill.visualize import new_figure, save_figure


def confusion_from_predictions(labels, predictions, num_classes: int, mask=None) -> np.ndarray:
  """`(C, C)` counts, rows = true class, columns = predicted class."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
  weights = None if mask is None else np.asarray(mask).reshape(-1)
  counts = np.zeros((num_classes, num_classes), np.float64)
  np.add.at(counts, (labels, predictions), 1.0 if weights is None else weights)
  return counts.astype(np.int64)


def plot_confusion_matrix(
  counts,
  class_names: Sequence[str] | None,
  path: str | os.PathLike,
  *,
  title: str | None = None,
  annotate: bool | None = None,
) -> epath.Path:
  """Rows = true class, columns = predicted; colour = the row's fraction
  (per-class recall on the diagonal), cells annotated with counts when there
  are at most 30 classes. Returns `path`."""
  counts = np.asarray(counts)
  c = counts.shape[0]
  if counts.shape != (c, c):
    raise ValueError(f"confusion counts must be square, got {counts.shape}")
  names = list(class_names or [])
  names += [str(i) for i in range(len(names), c)]  # a head wider than the data
  names = names[:c]
  rows = counts.sum(axis=1, keepdims=True)
  frac = np.divide(counts, rows, out=np.zeros(counts.shape, np.float64), where=rows > 0)
  total = int(counts.sum())
  accuracy = float(np.trace(counts)) / max(total, 1)
  annotate = c <= 30 if annotate is None else annotate
  size = float(np.clip(0.45 * c + 2.5, 4.5, 16.0))
  fig = new_figure(size + 1.2, size)
  ax = fig.subplots()
  im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
  cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  cbar.set_label("fraction of the true class")
  if c <= 60:
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
  if annotate:
    for i in range(c):
      for j in range(c):
        if counts[i, j]:
          ax.text(
            j,
            i,
            str(int(counts[i, j])),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if frac[i, j] > 0.5 else "black",
          )
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  head = title or "confusion matrix"
  ax.set_title(f"{head}\n{total} examples, top-1 {100 * accuracy:.1f}%", fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)
