"""Kind `schedule`: per-step lr of the warmup + half-cycle cosine schedule,
built with the same function the training loop uses."""

from __future__ import annotations

import numpy as np

from mimdistill.training.schedules import from_epochs

# Learning rates are ~1e-3; float32 evaluation of the schedule is ~1e-10 off.
LR_TOL = 1e-9


def check(folder, config, report):
  expected = np.load(folder / "expected.npz")
  for case in config["cases"]:
    want = expected[case["key"]]
    sched = from_epochs(
      case["lr"],
      case.get("min_lr", 0.0),
      case["epochs"],
      case["warmup_epochs"],
      case["steps_per_epoch"],
    )
    got = np.asarray(sched(np.arange(len(want))), np.float64)
    report.compare(folder.name, case["key"], got, want, tol=LR_TOL)
