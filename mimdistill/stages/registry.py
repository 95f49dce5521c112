"""Maps a config's `stage` field to the module that runs it."""

from __future__ import annotations

import importlib

STAGES = {
  "pretrain": "mimdistill.stages.pretrain",
  "distill": "mimdistill.stages.distill",
  "finetune": "mimdistill.stages.finetune",
}


def run_stage(config, workdir, lineage: dict | None = None) -> dict:
  stage = config.get("stage")
  if stage not in STAGES:
    raise ValueError(f"config.stage={stage!r} is not one of {sorted(STAGES)}")
  return importlib.import_module(STAGES[stage]).run(config, workdir, lineage=lineage)
