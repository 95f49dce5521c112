"""Pictures of a run, written by the stages into their workdir as PNG.

  reconstructions  stage 1: MAE reconstructions of a few eval images
  relation_maps  stage 2: the teacher's vs the student's Q-K relation maps
                 (attention of a query token over the patch grid) side by side
  curves         stage 3 (any workdir): train loss, learning rate and eval
                 top-1 over steps, read from `metrics.jsonl`
  confusion      stage 3: the confusion matrix on the eval split
  segmentation   stage 4: image / ground truth / prediction with a fixed palette

Every plotting function takes arrays or paths and returns the PNG's path. They
draw on a `matplotlib.figure.Figure` with its own Agg canvas and never touch
`pyplot`, so they work headless and leave a notebook's backend alone.
"""

from __future__ import annotations

import io
import os

from etils import epath

from mimdistill.paths import as_path


def new_figure(width: float, height: float, dpi: int = 100):
  """A figure on its own Agg canvas (no pyplot, no global backend)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig, path: str | os.PathLike) -> epath.Path:
  """Writes `fig` as PNG (creating the folder; local or gs://) and returns
  the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
  return write_png_bytes(buffer.getvalue(), path)


def write_png_bytes(data: bytes, path: str | os.PathLike) -> epath.Path:
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path
