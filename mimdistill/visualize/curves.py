"""Learning curves from a workdir's `metrics.jsonl` (stage 3's
`learning_curves.png`; any stage's workdir works).

Each line of `metrics.jsonl` is `{"step", "prefix": "train" | "eval", "loss",
"lr", "top1", ...}`. A resumed run appends the steps after its checkpoint
again; the last record of each (prefix, step) wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from mimdistill.paths import as_path
from mimdistill.visualize import new_figure, save_figure

PathLike = str | os.PathLike
METRICS = "metrics.jsonl"


def metrics_path(source: PathLike) -> epath.Path:
  """A workdir or a metrics.jsonl file -> the metrics.jsonl file."""
  path = as_path(source)
  return path / METRICS if path.is_dir() or not path.name.startswith(METRICS) else path


def read_metrics(source: PathLike) -> dict[str, dict[str, np.ndarray]]:
  """`{prefix: {"step": steps, key: values (NaN where a line lacks it)}}`,
  sorted by step, one entry per step (the last logged)."""
  from mimdistill.training.metrics import read_metrics_lines

  path = metrics_path(source)
  lines = read_metrics_lines(path)
  if not lines and not path.is_file():
    raise FileNotFoundError(
      f"{path} does not exist: point at a workdir a stage has trained in (it writes metrics.jsonl)"
    )
  latest: dict[tuple[str, int], dict] = {}
  for line in lines:
    line = line.strip()
    if not line:
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      # A run killed mid-write leaves a partial last line.
      continue
    if "step" not in record:
      continue
    latest[(record.get("prefix", "train"), int(record["step"]))] = record
  out: dict[str, dict[str, np.ndarray]] = {}
  for prefix in sorted({p for p, _ in latest}):
    steps = sorted(s for p, s in latest if p == prefix)
    records = [latest[(prefix, s)] for s in steps]
    keys = sorted(
      {
        k
        for r in records
        for k, v in r.items()
        if k not in ("prefix", "step") and isinstance(v, (int, float))
      }
    )
    series = {"step": np.asarray(steps, np.int64)}
    for k in keys:
      series[k] = np.asarray([float(r.get(k, np.nan)) for r in records])
    out[prefix] = series
  return out


def _as_sources(sources) -> dict[str, PathLike]:
  if isinstance(sources, Mapping):
    return dict(sources)
  if isinstance(sources, (str, os.PathLike)):
    return {"": sources}
  return {as_path(s).name: s for s in sources}


def plot_learning_curves(
  sources: PathLike | Sequence[PathLike] | Mapping[str, PathLike],
  path: PathLike,
  *,
  title: str | None = None,
) -> epath.Path:
  """Train loss, learning rate and eval top-1 over steps; returns `path`.

  sources: a workdir (or its metrics.jsonl), a list of them, or
    `{label: workdir}` (one line per source in every panel, e.g. the three
    stages of a pipeline).
  The loss panel also shows the eval loss (dots) where there is one, the
  accuracy panel top-5 (dashed) where there is one; a panel without data
  says so.
  """
  sources = _as_sources(sources)
  data = {label: read_metrics(src) for label, src in sources.items()}
  fig = new_figure(13.5, 3.6)
  ax_loss, ax_lr, ax_acc = fig.subplots(1, 3, sharex=True)  # one step axis
  colours = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
  have = {"loss": False, "lr": False, "acc": False}
  for n, (label, series) in enumerate(data.items()):
    colour = colours[n % len(colours)]
    name = f"{label} " if label else ""
    train, evals = series.get("train", {}), series.get("eval", {})
    if "loss" in train and np.isfinite(train["loss"]).any():
      ax_loss.plot(train["step"], train["loss"], color=colour, lw=1.3, label=f"{name}train")
      have["loss"] = True
    if "loss" in evals and np.isfinite(evals["loss"]).any():
      ax_loss.plot(evals["step"], evals["loss"], "o", color=colour, ms=4, label=f"{name}eval")
      have["loss"] = True
    if "lr" in train and np.isfinite(train["lr"]).any():
      ax_lr.plot(train["step"], train["lr"], color=colour, lw=1.3, label=label or None)
      have["lr"] = True
    if "top1" in evals and np.isfinite(evals["top1"]).any():
      ax_acc.plot(
        evals["step"], 100 * evals["top1"], "o-", color=colour, ms=4, lw=1.3, label=f"{name}top-1"
      )
      have["acc"] = True
      if "top5" in evals and np.isfinite(evals["top5"]).any():
        ax_acc.plot(
          evals["step"],
          100 * evals["top5"],
          "s--",
          color=colour,
          ms=3,
          lw=1.0,
          alpha=0.6,
          label=f"{name}top-5",
        )
  panels = (
    (ax_loss, "loss", "loss"),
    (ax_lr, "lr", "learning rate"),
    (ax_acc, "acc", "eval accuracy (%)"),
  )
  for ax, key, ylabel in panels:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not have[key]:
      ax.text(
        0.5,
        0.5,
        f"no {ylabel} logged",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="gray",
      )
    elif ax.get_legend_handles_labels()[1]:
      ax.legend(fontsize=8)
  ax_loss.set_title("loss")
  ax_lr.set_title("learning rate")
  ax_acc.set_title("eval top-1")
  if have["acc"]:
    ax_acc.set_ylim(0, 101)
  ax_loss.ticklabel_format(axis="y", useOffset=False)  # no "+2.3025" offsets
  ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
  if title is None:
    title = ", ".join(str(metrics_path(s).parent) for s in sources.values())
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return save_figure(fig, path)
