r"""Kill -9 anywhere, rerun, and get the same params: a check of resumption.

  python launch/kill_resume_check.py --points 14 --dir /tmp/kill_check [--seed 0]

Runs a tiny four-stage pipeline (the quickstart's stages at width 32, depth
2 (the student 4), 6-8 steps each, every stage checkpointing asynchronously, stages 3
and 4 evaluating) once without interruption, then, for each of `--points` kill
points, starts the same pipeline in a fresh workdir (and a fresh TFDS data
dir, so dataset preparation is on the path too), waits for that point's
moment (the dataset being prepared, a stage's first steps, a checkpoint save
in flight, an evaluation, the summary; taken in turn), sends SIGKILL after a
random extra delay, and reruns the same command until it finishes (a rerun
may be killed again). Every stage's final params must equal the
uninterrupted run's bit for bit (max |diff| 0.0). Prints one line per point
(the time of the kill, what the run was doing then: preparing data, a stage
and its latest checkpoint, evaluation) and exits 1 if any point differs or
any rerun fails.
"""

from __future__ import annotations

import pathlib
import random
import signal
import subprocess
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimdistill import scratch_folder  # noqa: E402
from mimdistill.launch_flags import stray_argument  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("points", 14, "kill points (the moments are taken in turn: 14 = each once)")
flags.DEFINE_string("dir", "/tmp/kill_resume_check", "scratch folder")
flags.DEFINE_integer("seed", 0, "seed of the kill times")

STAGES = ("pretrain", "distill", "finetune", "segment")
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
  "--config.segment.total_steps=6",
  "--config.segment.eval_every=3",
  "--config.segment.eval_batch_size=40",
  "--config.finetune.eval_every=3",
  "--config.finetune.eval_batch_size=200",
  "--config.pretrain.num_visualize=2",
  "--config.distill.num_visualize=0",
  "--config.finetune.figures=False",
  *(
    f"--config.{m}.{k}={v}"
    for m in (
      "pretrain.model",
      "distill.teacher",
      "distill.student",
      "finetune.model",
      "segment.model",
    )
    for k, v in (("width", 32), ("depth", 2), ("num_heads", 2), ("patch_size", 8))
  ),
  "--config.pretrain.model.decoder.width=32",
  "--config.pretrain.model.decoder.depth=1",
  "--config.pretrain.model.decoder.num_heads=2",
  # The segmentor taps four distinct blocks, so the student is 4 blocks deep.
  *(f"--config.{m}.depth=4" for m in ("distill.student", "finetune.model", "segment.model")),
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


# (what, condition on the workdir and data dir): the moments to kill at, in turn.
def _steps(work, stage):
  from mimdistill import workdir as workdir_lib

  return workdir_lib.checkpoint_steps(work / stage)


def _logged(work, stage) -> int:
  path = work / stage / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.is_file() else 0


def _saving(work, stage) -> bool:
  ckpt = work / stage / "checkpoints"
  return ckpt.is_dir() and any("tmp" in p.name for p in ckpt.iterdir())


MOMENTS = (
  ("preparing the dataset", lambda w, d: d.exists()),
  ("a pretrain step", lambda w, d: _logged(w, "pretrain") >= 1),
  ("a pretrain checkpoint save", lambda w, d: _saving(w, "pretrain") or _steps(w, "pretrain")),
  ("distill start (teacher loading, compile)", lambda w, d: (w / "distill").exists()),
  ("a distill step", lambda w, d: _logged(w, "distill") >= 2),
  ("a distill checkpoint save", lambda w, d: _saving(w, "distill") or _steps(w, "distill")),
  ("finetune start (init from distill)", lambda w, d: (w / "finetune").exists()),
  ("a finetune step", lambda w, d: _logged(w, "finetune") >= 1),
  ("a finetune evaluation", lambda w, d: _logged(w, "finetune") >= 3),
  ("the last finetune save", lambda w, d: _steps(w, "finetune")[-1:] == [6]),
  ("segment start (init from distill)", lambda w, d: (w / "segment").exists()),
  ("a segment step", lambda w, d: _logged(w, "segment") >= 1),
  ("a segment evaluation and checkpoint save", lambda w, d: _logged(w, "segment") >= 3),
  ("the last segment save and summary", lambda w, d: _steps(w, "segment")[-1:] == [6]),
)


def run(cmd, log, moment=None, work=None, data=None, rng=None) -> tuple[int, str]:
  """Runs `cmd`; with a moment, SIGKILLs it once the moment's condition holds
  plus a random delay of up to 1 s. Returns (return code, what happened)."""
  with open(log, "a") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if moment is None:
      return proc.wait(), "finished"
    what, ready = moment
    start = time.time()
    while proc.poll() is None:
      try:
        hit = ready(work, data)
      except OSError:  # a folder renamed while looking
        hit = False
      if hit:
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          return proc.returncode, f"killed at {time.time() - start:.1f} s during {what}"
        break
      time.sleep(0.05)
    return proc.wait(), f"finished before {what}"


def main(argv) -> int:
  stray = stray_argument(FLAGS, sys.argv, argv[1:])
  if stray:
    print(f"error: {stray}", file=sys.stderr)
    return 2
  import numpy as np

  from mimdistill.launch_flags import configure_logging

  configure_logging()  # Orbax's restore lines (read_params) stay off the report

  if FLAGS.points < 1:
    print(f"error: --points={FLAGS.points} must be >= 1", file=sys.stderr)
    return 2
  try:
    root = scratch_folder.fresh(FLAGS.dir, "launch/kill_resume_check.py")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rng = random.Random(FLAGS.seed)
  t0 = time.time()
  rc, _ = run(command(root / "ref", root / "ref_data"), root / "ref.log")
  if rc:
    print(f"the uninterrupted run failed (rc {rc}); see {root / 'ref.log'}")
    return 1
  print(f"uninterrupted run: {time.time() - t0:.0f} s", flush=True)
  reference = final_params(root / "ref")
  failures = 0
  for i in range(FLAGS.points):
    work, data, log = root / f"w{i}", root / f"d{i}", root / f"w{i}.log"
    moment = MOMENTS[i % len(MOMENTS)]
    rc, first = run(command(work, data), log, moment, work, data, rng)
    events = [first]
    if rng.random() < 0.3:  # a second kill, during the rerun
      second = MOMENTS[rng.randrange(len(MOMENTS))]
      rc, again = run(command(work, data), log, second, work, data, rng)
      events.append(again)
    rc, _ = run(command(work, data), log)
    if rc:
      print(f"point {i}: {'; then '.join(events)}; the rerun failed (rc {rc}); see {log}")
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
    print(f"point {i}: {'; then '.join(events)}; rerun finished; max |diff| {diff}", flush=True)
    failures += diff != 0.0
  print(f"kill_resume_check: {FLAGS.points - failures} of {FLAGS.points} points bit-identical")
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
