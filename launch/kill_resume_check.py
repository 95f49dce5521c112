r"""Kill -9 anywhere, rerun, and get the same params: a check of resumption.

  python launch/kill_resume_check.py --points 10 --dir /tmp/kill_check [--seed 0]

Runs a tiny three-stage pipeline (the quickstart's stages at width 32, depth
2, 6-8 steps each, every stage checkpointing asynchronously, stage 3
evaluating) once without interruption, then, for each of `--points` random
moments, starts the same pipeline in a fresh workdir (and a fresh TFDS data
dir, so dataset preparation is on the path too), sends it SIGKILL at that
moment, and reruns the same command until it finishes (a rerun may be killed
again at a second random moment). Every stage's final params must equal the
uninterrupted run's bit for bit (max |diff| 0.0). Prints one line per point
(the time of the kill, what the run was doing then: preparing data, a stage
and its latest checkpoint, evaluation) and exits 1 if any point differs or
any rerun fails.
"""

from __future__ import annotations

import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_integer("points", 10, "random kill points")
flags.DEFINE_string("dir", "/tmp/kill_resume_check", "scratch folder")
flags.DEFINE_integer("seed", 0, "seed of the kill times")

STAGES = ("pretrain", "distill", "finetune")
OVERRIDES = [
  *(
    f"--config.{s}.{k}={v}"
    for s in STAGES
    for k, v in (
      ("batch_size", 16),
      ("log_every", 1),
      ("checkpoint_every", 2),
      ("async_checkpoints", True),
    )
  ),
  "--config.pretrain.total_steps=8",
  "--config.distill.total_steps=6",
  "--config.finetune.total_steps=6",
  "--config.finetune.eval_every=3",
  "--config.finetune.eval_batch_size=200",
  "--config.pretrain.num_visualize=2",
  "--config.distill.num_visualize=0",
  "--config.finetune.figures=False",
  *(
    f"--config.{m}.{k}={v}"
    for m in ("pretrain.model", "distill.teacher", "distill.student", "finetune.model")
    for k, v in (("width", 32), ("depth", 2), ("num_heads", 2), ("patch_size", 8))
  ),
  "--config.pretrain.model.decoder.width=32",
  "--config.pretrain.model.decoder.depth=1",
  "--config.pretrain.model.decoder.num_heads=2",
]


def command(workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
  data = [f"--config.{s}.data.data_dir={data_dir}" for s in STAGES]
  return [
    sys.executable,
    str(REPO / "launch" / "pipeline.py"),
    "--config",
    str(REPO / "configs" / "pipeline.py") + ":quickstart",
    "--workdir",
    str(workdir),
    *OVERRIDES,
    *data,
  ]


def final_params(workdir: pathlib.Path) -> dict:
  import jax
  import numpy as np

  from mimdistill.interop.orbax_tree import restore_subtree

  out = {}
  for stage in STAGES:
    params, _ = restore_subtree(str(workdir / stage), ("params",))
    out[stage] = {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
  return out


def doing(workdir: pathlib.Path, data_dir: pathlib.Path) -> str:
  """What a killed run was doing, read from what it left."""
  from mimdistill import workdir as workdir_lib

  if not any(data_dir.rglob("dataset_info.json")):
    return "preparing the dataset"
  for stage in STAGES:
    if workdir_lib.read_json(workdir / stage, workdir_lib.STAGE_DONE) is None:
      steps = workdir_lib.checkpoint_steps(workdir / stage)
      tmp = (
        list((workdir / stage / "checkpoints").glob("*tmp*")) if (workdir / stage).exists() else []
      )
      state = f"latest checkpoint {steps[-1] if steps else None}"
      if tmp:
        state += ", a save in flight"
      return f"{stage}, {state}"
  return "writing the summary"


def run(cmd, log, kill_after: float | None) -> tuple[int, float]:
  start = time.time()
  with open(log, "a") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    try:
      proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  return proc.returncode, time.time() - start


def main(argv) -> int:
  del argv
  import numpy as np

  root = pathlib.Path(FLAGS.dir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  rng = random.Random(FLAGS.seed)
  rc, total = run(command(root / "ref", root / "ref_data"), root / "ref.log", None)
  if rc:
    print(f"the uninterrupted run failed (rc {rc}); see {root / 'ref.log'}")
    return 1
  print(f"uninterrupted run: {total:.0f} s", flush=True)
  reference = final_params(root / "ref")
  failures = 0
  for i in range(FLAGS.points):
    work, data, log = root / f"w{i}", root / f"d{i}", root / f"w{i}.log"
    kills = []
    at = rng.uniform(0.05, 0.95) * total
    rc, _ = run(command(work, data), log, at)
    kills.append((at, doing(work, data)))
    if rng.random() < 0.3:  # a second kill during the rerun
      at2 = rng.uniform(0.05, 0.6) * total
      rc, _ = run(command(work, data), log, at2)
      kills.append((at2, doing(work, data)))
    rc, _ = run(command(work, data), log, None)
    if rc:
      print(f"point {i}: the rerun failed (rc {rc}); see {log}")
      failures += 1
      continue
    got = final_params(work)
    diff = max(
      float(
        np.max(np.abs(got[s][k].astype(np.float64) - reference[s][k].astype(np.float64)), initial=0)
      )
      for s in STAGES
      for k in reference[s]
    )
    where = "; then ".join(f"killed at {t:.1f} s ({what})" for t, what in kills)
    print(f"point {i}: {where}; rerun finished; max |diff| {diff}", flush=True)
    failures += diff != 0.0
  print(f"kill_resume_check: {FLAGS.points - failures} of {FLAGS.points} points bit-identical")
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
