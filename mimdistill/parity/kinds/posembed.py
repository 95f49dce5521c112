"""Kind `posembed`: 2-D sin-cos position embedding with CLS row."""

from __future__ import annotations

import numpy as np

from mimdistill.models.pos_embed import sincos_2d


def check(folder, config, report):
  expected = np.load(folder / "expected.npz")
  for case in config["cases"]:
    got = sincos_2d(
      int(case["dim"]), int(case["grid"]), cls_token=bool(case.get("cls_token", True))
    )
    report.compare(folder.name, case["key"], got, expected[case["key"]])
