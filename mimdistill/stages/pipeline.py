"""The three stages as one resumable job.

`run_pipeline(config, W)` runs the stages named in `config.stages` in
`W/<stage>`, wiring each stage's source to the previous stage's workdir
(stage 2's teacher, stage 3's and stage 4's init) unless the config names
one. A stage section with a `parent` field names the stage it starts from
instead ('distill': segmentation as a sibling of fine-tuning, both
children of the distilled checkpoint; 'none': no parent, the configured
source is kept). A stage that
finished leaves `W/<stage>/stage_done.json` and is skipped on a rerun; an
interrupted stage resumes from its latest checkpoint (the shared loop does
that). `W/summary.json` holds, per stage, metrics, time, steps, checkpoint
and the lineage (which checkpoint each stage started from).
"""

from __future__ import annotations

import json
import logging
import time

import jax
from etils import epath

from mimdistill import workdir as workdir_lib
from mimdistill.paths import check_workdir
from mimdistill.stages import registry
from mimdistill.workdir_lock import WorkdirLock

log = logging.getLogger("mimdistill")
DONE = workdir_lib.STAGE_DONE
RERUN = "rerun.json"


def _link(name: str, stage_cfg, previous: epath.Path | None, teacher_source: str):
  """Points the stage at its parent; returns a description for the log."""
  kind = stage_cfg.stage
  if kind in ("distill", "hetero_distill"):
    if previous is not None:
      stage_cfg.teacher.source = str(previous)
    elif teacher_source:
      stage_cfg.teacher.source = teacher_source
    if not stage_cfg.teacher.source:
      raise ValueError(
        f"stage {name!r} has no teacher: run a pretrain stage "
        "before it or set --config.teacher_source"
      )
    return f"teacher {stage_cfg.teacher.source}"
  if kind == "cae":
    # The previous stage's workdir (a ViT), else teacher_source, else the
    # config's own source (a CLIP file).
    if previous is not None or teacher_source:
      stage_cfg.teacher.source = str(previous) if previous is not None else teacher_source
      stage_cfg.teacher.type = "auto"
    if not stage_cfg.teacher.source:
      raise ValueError(
        f"stage {name!r} has no teacher: run a pretrain stage before it or set "
        "--config.teacher_source (a workdir or a CLIP .pt)"
      )
    return f"teacher {stage_cfg.teacher.source}"
  if kind in ("finetune", "segment") and previous is not None:
    stage_cfg.init.source = str(previous)
    return f"init {previous}"
  return "no parent"


def _done_record(name: str, stage_cfg, stage_dir) -> dict | None:
  """The stage's done-record if it finished with this config (the fields of
  `workdir.RESUMABLE` aside); raises if it finished with another one."""
  done = workdir_lib.read_json(stage_dir, DONE)
  if done is None:
    return None
  if "config" not in done:
    log.warning(
      "pipeline: %s in %s finished before configs were recorded; skipped", name, stage_dir
    )
    return done
  changes = workdir_lib.config_changes(done["config"], stage_cfg.to_dict())
  if changes:
    raise ValueError(
      f"pipeline: stage {name!r} finished in {stage_dir} with another config "
      f"({workdir_lib.describe_changes(changes)}), so its result is not this config's; use a new "
      f"--workdir, or --config.rerun_from={name} to run it and the stages after it again (the "
      f"finished ones are kept as {name}.replaced-<time>)"
    )
  return done


def _apply_rerun(config, names: list[str], workdir) -> None:
  """Moves the workdirs of `config.rerun_from` and the stages after it aside
  (`<stage>.replaced-<time>`, nothing is deleted), once per pipeline config:
  a rerun that is itself interrupted resumes instead of starting over."""
  target = config.rerun_from
  if not target:
    return
  if target not in names:
    raise ValueError(f"rerun_from={target!r} is not one of the stages {names}")
  marker = {"from": target, "config": config.to_dict()}
  if workdir_lib.read_json(workdir, RERUN) == json.loads(json.dumps(marker, default=str)):
    return
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for name in names[names.index(target) :]:
    stage_dir = workdir / name
    if stage_dir.exists():
      aside, n = workdir / f"{name}.replaced-{stamp}", 1
      while aside.exists():
        n += 1
        aside = workdir / f"{name}.replaced-{stamp}-{n}"
      stage_dir.rename(aside)
      log.warning("pipeline: rerun_from=%s: moved %s to %s", target, stage_dir, aside)
  workdir_lib.write_json(workdir, RERUN, marker)


# How far along the chain a stage kind sits: each stage starts from the one
# before it, so a pipeline runs pre-training, then distillation, then the
# downstream tasks; one of these out of order would start from the wrong
# checkpoint (fine-tuning from random init, distilling from a classifier).
_STEP = {
  "pretrain": 0,
  "spark_pretrain": 0,
  "distill": 1,
  "hetero_distill": 1,
  "cae": 1,
  "finetune": 2,
  "segment": 2,
}
_STEP_NAME = ("pre-training", "distillation", "fine-tuning / segmentation")


def _plan(config, names: list[str]) -> dict[str, str | None]:
  """Each stage's parent stage (None: none), checked before any stage runs:
  the stages are named once and in chain order, and a stage starts from a
  stage that runs before it (its `parent` field, else the previous one)."""
  defined = sorted(k for k in config.keys() if hasattr(config[k], "stage"))
  stages = ",".join(names)
  if not names:
    raise ValueError(
      f"config.stages={config.stages!r} names no stage; set --config.stages to some of {defined} "
      "in order, e.g. pretrain,distill,finetune"
    )
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"config.stages={stages} names {repeated} twice; name each stage once")
  plan: dict[str, str | None] = {}
  for i, name in enumerate(names):
    kind = config[name].stage
    step = _STEP.get(kind, 0)
    later = [n for n in names[:i] if _STEP.get(config[n].stage, 0) > step]
    if later:
      raise ValueError(
        f"config.stages={stages} runs {name!r} ({_STEP_NAME[step]}) after {later[0]!r} "
        f"({_STEP_NAME[_STEP[config[later[0]].stage]]}); a stage starts from the one before it, "
        "so order them pre-training -> distillation -> fine-tuning / segmentation"
      )
    parent = config[name].get("parent") or ""
    previous = names[i - 1] if i else None
    if parent == "none":
      plan[name] = None
    elif parent:
      if parent not in plan:
        raise ValueError(
          f"stage {name!r} names parent {parent!r}, which does not run before it in "
          f"config.stages={stages}; set --config.{name}.parent to one of "
          f"{sorted(plan) + ['none']}"
        )
      plan[name] = parent
    elif previous is not None and step == 2 and _STEP.get(config[previous].stage) == 2:
      # Fine-tuning from a segmentor (or the reverse) is possible but never
      # what an ordering slip meant: it has to be asked for by name.
      fix = (
        f"set --config.{name}.parent={previous} to start from it on purpose, or to the stage "
        "it should start from"
        if "parent" in config[name]
        else f"put {name!r} before {previous!r}"
      )
      raise ValueError(
        f"config.stages={stages}: {name!r} would start from {previous!r}, itself a "
        f"fine-tuning / segmentation result; {fix}"
      )
    else:
      plan[name] = previous
  return plan


def run_pipeline(config, workdir) -> dict:
  """Runs the stages in order (see the module doc), holding the pipeline
  workdir's lock; every stage holds its own workdir's."""
  if "stages" not in config:  # a stage config failed here as an AttributeError traceback
    hint = (
      f" is a {config.stage} stage config: run it with launch/train.py" if "stage" in config else ""
    )
    raise ValueError(
      f"--config {config.get('preset', '')!r}{hint}; launch/pipeline.py runs a pipeline "
      "config (one with `stages`), e.g. configs/pipeline.py:quickstart"
    )
  workdir = check_workdir(workdir)
  with WorkdirLock(workdir):
    return _run_pipeline(config, workdir)


def _run_pipeline(config, workdir) -> dict:
  names = [n.strip() for n in config.stages.split(",") if n.strip()]
  unknown = [n for n in names if n not in config]
  if unknown:
    raise ValueError(
      f"config.stages names {unknown}, which the config does not "
      f"define; defined: {sorted(k for k in config.keys() if hasattr(config[k], 'stage'))}"
    )
  if config.get("teacher_source") and names and config[names[0]].stage == "pretrain":
    log.info(
      "pipeline: teacher_source=%s replaces the %s stage (not run)", config.teacher_source, names[0]
    )
    names = names[1:]  # an external teacher replaces stage 1
  teachers = ("distill", "hetero_distill", "cae")
  if config.get("teacher_source") and names and config[names[0]].stage not in teachers:
    raise ValueError(
      f"teacher_source={config.teacher_source} has no stage to teach: the first stage to run, "
      f"{names[0]!r}, is a {config[names[0]].stage} stage; start --config.stages with a "
      "distillation stage, or clear --config.teacher_source="
    )
  plan = _plan(config, names)
  _apply_rerun(config, names, workdir)
  # Every stage still to run is checked before the first starts: a bad value
  # in the last stage would otherwise surface only after the earlier ones had
  # trained (days on ImageNet). `data=False`: the parents' workdirs, which
  # the stages read, do not exist yet.
  for name in names:
    if workdir_lib.read_json(workdir / name, DONE) is None:
      registry.stage_module(config[name]).validate(config[name], data=False)
  summary = {"workdir": str(workdir), "stages": []}
  for name in names:
    stage_cfg = config[name]
    stage_dir = workdir / name
    parent_dir = workdir / plan[name] if plan[name] else None
    with stage_cfg.unlocked():
      parent_desc = _link(name, stage_cfg, parent_dir, config.get("teacher_source", ""))
    done = _done_record(name, stage_cfg, stage_dir)
    if done is not None:
      log.info("pipeline: %s already finished in %s, skipped", name, stage_dir)
      record = done
      record["skipped"] = True
    else:
      log.info("pipeline: %s in %s (%s)", name, stage_dir, parent_desc)
      t0 = time.time()
      result = registry.run_stage(stage_cfg, stage_dir)
      record = {
        "name": name,
        "stage": stage_cfg.stage,
        "workdir": str(stage_dir),
        "seconds": round(time.time() - t0, 1),
        **result,
        "checkpoint": _latest_checkpoint(stage_dir),
        "lineage": workdir_lib.read_json(stage_dir, workdir_lib.LINEAGE),
        "final_metrics": workdir_lib.read_json(stage_dir, workdir_lib.FINAL_METRICS),
        "config": stage_cfg.to_dict(),
      }
      workdir_lib.write_json(stage_dir, DONE, record)
    summary["stages"].append(record)
  workdir_lib.write_json(workdir, "summary.json", summary)
  if jax.process_index() == 0:
    print_summary(summary)
  return summary


def _latest_checkpoint(stage_dir: epath.Path) -> str | None:
  steps = workdir_lib.checkpoint_steps(stage_dir)
  return str(workdir_lib.checkpoint_dir(stage_dir) / str(steps[-1])) if steps else None


def print_summary(summary: dict) -> None:
  print("\n== mimdistill pipeline summary:", summary["workdir"])
  for s in summary["stages"]:
    metrics = s.get("final_metrics") or {}
    parent = (s.get("lineage") or {}).get("parent") or {}
    parent = parent.get("path") or parent.get("source") or "-"
    extra = ""
    if s.get("top1") is not None:
      extra = f" top1={s['top1']:.4f} top5={s.get('top5') or 0:.4f}"
    if s.get("mIoU") is not None:
      extra += f" mIoU={s['mIoU']:.2f} mAcc={s.get('mAcc') or 0:.2f} aAcc={s.get('aAcc') or 0:.2f}"
    print(
      f"  {s['name']:<10} steps={s.get('steps')} loss={metrics.get('loss', float('nan')):.4f}"
      f"{extra} time={s.get('seconds')}s{' (skipped, done before)' if s.get('skipped') else ''}"
      f"\n             checkpoint={s.get('checkpoint')} parent={parent}"
    )
  print(
    json.dumps(
      {
        "final_top1": next(
          (s.get("top1") for s in reversed(summary["stages"]) if s.get("top1") is not None), None
        ),
        "final_mIoU": next(
          (s.get("mIoU") for s in reversed(summary["stages"]) if s.get("mIoU") is not None), None
        ),
      }
    )
  )
