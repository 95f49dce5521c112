"""The Cloud TPU launcher: the exact gcloud command sequence (--dry-run) for a
v4-32 slice, clear errors, runtime-version inference, the remote shell snippets
run for real in a fake worker home, and the spot resume loop against a fake
gcloud. Needs neither gcloud nor a network; a few seconds."""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

LAUNCHER = REPO / "launch" / "tpu_pod.py"
ZONE, PROJECT, NAME = "us-central2-b", "my-proj", "mim-v4"
WORKDIR = "gs://my-bucket/mimdistill/run1"
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def launch(*args, path_dirs=(), env=None):
  """Runs the launcher with a PATH holding only `path_dirs` (no gcloud, no git)."""
  empty = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
  full_env = {
    "PATH": os.pathsep.join(map(str, path_dirs)) or str(empty / "no-such-bin"),
    "HOME": os.environ.get("HOME", "/tmp"),
    **(env or {}),
  }
  return subprocess.run(
    [sys.executable, str(LAUNCHER), *args], env=full_env, capture_output=True, text=True, timeout=60
  )


def _load_launcher():
  spec = importlib.util.spec_from_file_location("tpu_pod", LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


tpu_pod = _load_launcher()


def launch_in_process(capsys, *args):
  """Same as `launch` but in this process (milliseconds): (rc, stdout, stderr)."""
  try:
    rc = tpu_pod.main(list(args))
  except SystemExit as e:  # argparse's own errors
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


def dry_run(*args):
  r = launch("--dry-run", *args)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def base_args(accel="v4-32", workdir=WORKDIR, config="configs/mae_pretrain.py:base"):
  return [
    "--name",
    NAME,
    "--zone",
    ZONE,
    "--project",
    PROJECT,
    "--accelerator-type",
    accel,
    "--workdir",
    workdir,
    "--config",
    config,
  ]


def remote(cmd):
  """The --command of an ssh line, checked to be valid shell."""
  assert cmd[-2] == "--command"
  subprocess.run(["bash", "-n", "-c", cmd[-1]], check=True)
  return cmd[-1]


def job_of(start_cmd: str) -> list[str]:
  m = re.search(r"exec nohup (.*?)\) > mimdistill-job\.log 2>&1 < /dev/null &", start_cmd)
  assert m, start_cmd
  return shlex.split(m.group(1))


def create_line(cmds):
  return next(c for c in cmds if c[:5] == GCLOUD_TPU + ["create"])


def test_v4_32_complete_sequence():
  cmds = dry_run(
    *base_args(), "--spot", "--delete-after", "--config.batch_size=1024", "--config.dtype=bfloat16"
  )
  assert len(cmds) == 7, cmds
  archive, create, copy, install, start, tail, delete = cmds
  where = [f"--zone={ZONE}", f"--project={PROJECT}"]

  # 1. the package: a git archive of HEAD of this checkout
  assert archive[:4] == ["git", "-C", str(REPO), "archive"]
  assert "--format=tar.gz" in archive and archive[-1] == "HEAD"
  tarball = next(a for a in archive if a.startswith("--output="))[len("--output=") :]

  # 2. create the slice: type, runtime image, zone, project, spot
  assert create == GCLOUD_TPU + ["create", NAME] + where + [
    "--accelerator-type=v4-32",
    "--version=tpu-ubuntu2204-base",
    "--spot",
  ]

  # 3. copy to every worker
  assert copy == GCLOUD_TPU + ["scp", tarball, f"{NAME}:mimdistill-src.tar.gz"] + where + [
    "--worker=all"
  ]

  # 4. install on every worker
  assert install[: 6 + len(where) + 1] == GCLOUD_TPU + ["ssh", NAME] + where + ["--worker=all"]
  inst = remote(install)
  assert "tar -xzf mimdistill-src.tar.gz -C mimdistill" in inst
  assert 'python3 -m pip install --quiet -U "jax[tpu]"' in inst
  assert inst.endswith(
    'cd mimdistill && python3 -m pip install --quiet -U "jax[tpu]"'
    ' && python3 -m pip install --quiet -e ".[gcs]"'
  )

  # 5. start on every worker, multi-host, under nohup with a log file
  assert start[: 6 + len(where) + 1] == GCLOUD_TPU + ["ssh", NAME] + where + ["--worker=all"]
  st = remote(start)
  assert job_of(st) == [
    "python3",
    "launch/train.py",
    "--config",
    "configs/mae_pretrain.py:base",
    "--workdir",
    WORKDIR,
    "--multihost",
    "--config.batch_size=1024",
    "--config.dtype=bfloat16",
  ]
  assert st.endswith("echo $! > mimdistill-job.pid")

  # 6. tail the log of worker 0 until its job ends
  assert tail[:-2] == GCLOUD_TPU + ["ssh", NAME] + where + ["--worker=0"]
  assert remote(tail) == "tail --pid=$(cat mimdistill-job.pid) -n +1 -F mimdistill-job.log"

  # 7. delete after the job
  assert delete == GCLOUD_TPU + ["delete", NAME] + where + ["--quiet"]


def test_pipeline_reuse_preemptible_and_passthrough():
  cmds = dry_run(
    *base_args(config="configs/pipeline.py:imagenet"),
    "--pipeline",
    "--preemptible",
    "--reuse",
    "--env",
    "TFDS_DATA_DIR=gs://b/tfds",
    "--config.data.data_dir=gs://b/tfds",
    "--",
    "--config.seed=3",
  )
  names = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
  assert names == ["git", "describe", "scp", "ssh", "ssh", "ssh"]
  # --reuse: describe, create only when that fails (one shell line)
  line = shlex.join(cmds[1])
  assert "describe" in cmds[1] and "||" in cmds[1]
  assert cmds[1][cmds[1].index("||") + 1 :][:5] == GCLOUD_TPU + ["create"]
  assert "--preemptible" in cmds[1] and "--spot" not in cmds[1], line
  st = remote(cmds[4])
  assert "export TFDS_DATA_DIR=gs://b/tfds && exec nohup" in st
  assert job_of(st) == [
    "python3",
    "launch/pipeline.py",
    "--config",
    "configs/pipeline.py:imagenet",
    "--workdir",
    WORKDIR,
    "--multihost",
    "--config.data.data_dir=gs://b/tfds",
    "--config.seed=3",
  ]


def test_git_url_install_and_tail_only():
  cmds = dry_run(
    *base_args(), "--git-url", "https://github.com/me/mimdistill", "--ref", "v0.1.0", "--no-tail"
  )
  assert [c[4] for c in cmds] == ["create", "ssh", "ssh"]  # no archive, no scp
  inst = remote(cmds[1])
  assert inst.startswith(
    "rm -rf mimdistill && git clone --quiet "
    "https://github.com/me/mimdistill mimdistill && "
    "git -C mimdistill checkout --quiet v0.1.0 && cd mimdistill"
  )
  (tail,) = dry_run("--name", NAME, "--zone", ZONE, "--accelerator-type", "v4-32", "--tail-only")
  assert "--worker=0" in tail and "--project" not in " ".join(tail)


@pytest.mark.parametrize(
  "accel, version, workers",
  [
    ("v4-8", "tpu-ubuntu2204-base", 1),
    ("v4-32", "tpu-ubuntu2204-base", 4),
    ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v5p-128", "v2-alpha-tpuv5", 16),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v6e-8", "v2-alpha-tpuv6e", 1),
    ("v6e-64", "v2-alpha-tpuv6e", 16),
  ],
)
def test_version_inference_and_multihost(capsys, accel, version, workers):
  workdir = WORKDIR if workers > 1 else "/tmp/mim"  # single host: local is fine
  rc, out, err = launch_in_process(capsys, "--dry-run", *base_args(accel, workdir=workdir))
  assert rc == 0, err
  cmds = [shlex.split(line) for line in out.splitlines()]
  assert f"--accelerator-type={accel}" in create_line(cmds)
  assert f"--version={version}" in create_line(cmds)
  assert f"{workers} worker VM(s)" in err
  assert ("--multihost" in job_of(remote(cmds[4]))) == (workers > 1)


def test_explicit_version_wins():
  cmds = dry_run(*base_args("v6e-16"), "--version", "v2-alpha-tpuv6e-custom")
  assert "--version=v2-alpha-tpuv6e-custom" in create_line(cmds)


@pytest.mark.parametrize(
  "args, needles",
  [
    (base_args(workdir="/tmp/run1"), ["--workdir '/tmp/run1'", "4 worker VMs", "gs://YOUR_BUCKET"]),
    (base_args("v5litepod-32", workdir="runs/a"), ["'runs/a'", "gs://"]),
    (base_args("v4-30"), ["v4-30", "multiple of 8"]),
    (base_args("v5e-16"), ["'v5e-16'", "v5litepod-16"]),
    (base_args("V4-32"), ["'V4-32'", "v4-32"]),
    (base_args("v6e-12"), ["v6e-12", "1, 4, 8, 16"]),
    (base_args("tpu-v4-32"), ["'tpu-v4-32'", "v4, v5p, v5litepod (v5e) or v6e"]),
    (base_args("v3-32"), ["'v3-32'", "not supported"]),
    (base_args() + ["--config.batch_size", "8"], ["--config.batch_size=VALUE"]),
    (base_args() + ["--spot", "--preemptible"], ["not allowed with"]),
    (base_args() + ["--name", "My_TPU"], ["'My_TPU'", "lower-case"]),
    (
      ["--zone", ZONE, "--accelerator-type", "v4-32", "--workdir", WORKDIR],
      ["--config is required"],
    ),
    (base_args() + ["--delete-after", "--no-tail"], ["--delete-after"]),
  ],
)
def test_errors_name_the_value_and_the_fix(capsys, args, needles):
  rc, out, err = launch_in_process(capsys, "--dry-run", *args)
  assert rc == 2, (out, err)
  assert out == ""
  for needle in needles:
    assert needle in err, err


def test_error_exit_status_from_the_command_line():
  r = launch("--dry-run", *base_args(workdir="/tmp/run1"))
  assert r.returncode == 2 and r.stdout == ""
  assert "tpu_pod.py: error: --workdir '/tmp/run1'" in r.stderr


@pytest.mark.skipif(
  not sys.platform.startswith("linux") or not shutil.which("bash"),
  reason="the worker snippets use bash, /proc and GNU tail",
)
def test_remote_snippets_in_a_fake_worker_home(tmp_path):
  """The start/tail commands as a worker runs them: returns at once, job in
  the background with its log and pid, a second start refused, the tail ends
  when the job does."""
  home = tmp_path / "home"
  (home / "mimdistill" / "launch").mkdir(parents=True)
  (home / "mimdistill" / "launch" / "train.py").write_text(
    textwrap.dedent("""
      import os, sys, time
      print("job", sys.argv[1:], os.environ["MSG"], flush=True)
      time.sleep(1.0)
      print("job done", flush=True)
  """)
  )
  args = base_args() + ["--python", sys.executable, "--env", "MSG=hello world"]
  cmds = dry_run(*args)
  start, tail = remote(cmds[4]), remote(cmds[5])
  sh = lambda c: subprocess.run(
    ["bash", "-c", c], cwd=home, capture_output=True, text=True, timeout=30
  )
  r = sh(start)
  assert r.returncode == 0, r.stderr
  pid = int((home / "mimdistill-job.pid").read_text())
  again = sh(start)
  assert again.returncode == 3 and f"(pid {pid})" in again.stderr
  r = sh(tail)
  assert r.returncode == 0
  assert f"'--workdir', '{WORKDIR}', '--multihost'" in r.stdout
  assert "hello world" in r.stdout and r.stdout.rstrip().endswith("job done")
  assert sh(start).returncode == 0  # the old job ended: a new start is fine
  proc = pathlib.Path(f"/proc/{int((home / 'mimdistill-job.pid').read_text())}")
  for _ in range(100):  # let it finish (it is ours to reap)
    if not proc.exists() or "Z" in (proc / "stat").read_text().split()[2]:
      break
    time.sleep(0.05)


FAKE_GCLOUD = """#!{python}
import json, os, sys
d = os.environ["FAKE_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[4] == "describe":
  with open(os.path.join(d, "states")) as f:
    states = f.read().split()
  with open(os.path.join(d, "states"), "w") as f:
    f.write("\\n".join(states[1:]))
  if states[0] == "NONE":
    sys.stderr.write("ERROR: (gcloud) NOT_FOUND: Resource was not found\\n")
    sys.exit(1)
  print(states[0])
elif sys.argv[4] == "ssh" and sys.argv[-1].startswith("tail"):
  with open(os.path.join(d, "tail_rcs")) as f:
    rcs = f.read().split()
  with open(os.path.join(d, "tail_rcs"), "w") as f:
    f.write("\\n".join(rcs[1:]))
  sys.exit(int(rcs[0]))
"""


def test_resume_loop_recreates_a_preempted_slice(tmp_path):
  """Against a fake gcloud: the slice does not exist -> create; the job's
  tail ends and the slice is PREEMPTED -> delete, create, install and start
  again (same workdir); then READY -> done, --delete-after deletes it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  # describe answers, in order: before create, after tail 1, before round 2's
  # create, after tail 2.
  (tmp_path / "states").write_text("NONE\nPREEMPTED\nPREEMPTED\nREADY\n")
  (tmp_path / "tail_rcs").write_text("255\n0\n")  # ssh dies with the slice
  r = launch(
    *base_args(),
    "--spot",
    "--reuse",
    "--resume-loop",
    "--delete-after",
    "--git-url",
    "https://github.com/me/mimdistill",
    path_dirs=[bin_dir],
    env={"FAKE_DIR": str(tmp_path)},
  )
  assert r.returncode == 0, r.stderr
  calls = [json.loads(l) for l in (tmp_path / "calls.jsonl").read_text().splitlines()]
  verbs = [
    c[3] + ("/" + c[c.index("--command") + 1].split()[0] if "--command" in c else "") for c in calls
  ]
  assert verbs == [
    "describe",
    "create",
    "ssh/rm",
    "ssh/if",
    "ssh/tail",
    "describe",
    "describe",
    "delete",
    "create",
    "ssh/rm",
    "ssh/if",
    "ssh/tail",
    "describe",
    "delete",
  ], verbs
  assert "re-creating it (1/20)" in r.stderr and WORKDIR in r.stderr
  starts = [c for c in calls if c[3] == "ssh" and c[-1].startswith("if ")]
  assert starts[0] == starts[1] and "--spot" in calls[1]


def test_missing_gcloud_is_a_clear_error(tmp_path):
  r = launch(*base_args(), "--git-url", "https://github.com/me/mimdistill")
  assert r.returncode == 2
  assert "gcloud not found" in r.stderr and "--dry-run" in r.stderr
