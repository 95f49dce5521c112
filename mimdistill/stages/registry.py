"""Maps a config's `stage` field to the module that runs it. Every stage
module has the same entry points: `validate(config, *, data=True)`,
`run(config, workdir, *, mesh=None, lineage=None) -> summary dict` and
`synthetic(config, steps_per_epoch) -> Synthetic` (its task on a random
batch, for the benchmark)."""

from __future__ import annotations

import importlib

from mimdistill.paths import check_workdir

STAGES = {
  "pretrain": "mimdistill.stages.pretrain",
  "distill": "mimdistill.stages.distill",
  "finetune": "mimdistill.stages.finetune",
  "segment": "mimdistill.stages.segment",
  "cae": "mimdistill.stages.cae",
  "spark_pretrain": "mimdistill.stages.spark_pretrain",
  "hetero_distill": "mimdistill.stages.hetero_distill",
}


def stage_module(config):
  stage = config.get("stage")
  if stage not in STAGES:
    hint = (
      "; this is a pipeline config (it has `stages`): run it with launch/pipeline.py"
      if "stages" in config
      else ""
    )
    raise ValueError(f"config.stage={stage!r} is not one of {sorted(STAGES)}{hint}")
  return importlib.import_module(STAGES[stage])


def run_stage(config, workdir, *, mesh=None, lineage: dict | None = None) -> dict:
  module = stage_module(config)
  return module.run(config, check_workdir(workdir), mesh=mesh, lineage=lineage)


def synthetic(config, steps_per_epoch: int):
  return stage_module(config).synthetic(config, steps_per_epoch)
