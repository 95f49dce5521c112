"""Kind `seg_schedule`: per-iteration lr of mmcv 1.3's poly decay with
linear warmup by iteration, for a group at the base lr and for layer-decay
groups from their own initial lr."""

from __future__ import annotations

import jax
import numpy as np

from mimdistill.training.poly_schedule import poly_warmup

# lrs are <= 1e-4; the float64 schedule is exact to round-off.
LR_TOL = 1e-12


def _schedule(case, initial_lr):
  return poly_warmup(
    initial_lr,
    int(case["max_iters"]),
    power=float(case.get("power", 1.0)),
    min_lr=float(case.get("min_lr", 0.0)),
    warmup=case.get("warmup"),
    warmup_iters=int(case.get("warmup_iters", 0)),
    warmup_ratio=float(case.get("warmup_ratio", 0.1)),
  )


def check(folder, config, report):
  expected = np.load(folder / "expected.npz")
  for case in config["cases"]:
    key = case["key"]
    iters = expected[f"{key}_iters"]
    with jax.enable_x64(True):
      base = float(case["base_lr"])
      got = np.asarray(_schedule(case, base)(iters), np.float64)
      groups = np.stack(
        [np.asarray(_schedule(case, base * s)(iters), np.float64) for s in case["lr_scales"]], 1
      )
    report.compare(folder.name, key, got, expected[key], tol=LR_TOL)
    if f"{key}_groups" in expected.files:
      report.compare(folder.name, f"{key}_groups", groups, expected[f"{key}_groups"], tol=LR_TOL)
    with jax.enable_x64(False):
      f32 = np.asarray(_schedule(case, float(case["base_lr"]))(iters), np.float64)
    # The training loop runs the schedule in float32.
    report.compare(folder.name, f"{key}:float32", f32, expected[key], tol=1e-10)
