r"""Runs a stage or the whole pipeline on a Cloud TPU VM slice (v4, v5e, v5p, v6e).

  python launch/tpu_pod.py --name mim --zone us-central2-b --project my-proj \
      --accelerator-type v4-32 --spot --reuse --resume-loop \
      --workdir gs://my-bucket/mimdistill/run1 \
      --config configs/pipeline.py:imagenet --pipeline --config.distill.dtype=bfloat16

Add --dry-run to print the exact commands, one per line, and run nothing.

What it does, in order (each a line of the --dry-run output):
  1. archive  `git archive` of --ref (default HEAD) of this checkout into a
              tarball (uncommitted changes are not in it; commit them first).
              With --git-url the workers `git clone` that URL instead (step 4)
              and there is no local step.
  2. create   `gcloud compute tpus tpu-vm create` with the accelerator type,
              the runtime --version (inferred from the type: v4 ->
              tpu-ubuntu2204-base, v5p -> v2-alpha-tpuv5, v5e (v5litepod-N)
              -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e), --spot or
              --preemptible. With --reuse the slice is `describe`d first and
              created only when it does not exist (a PREEMPTED/TERMINATED one
              is deleted and re-created).
  3. copy     `gcloud compute tpus tpu-vm scp --worker=all` of the tarball.
  4. install  on every worker (`ssh --worker=all`): unpack (or clone) into
              ~/mimdistill, `pip install -U "jax[tpu]"`, `pip install -e ".[gcs]"`
  5. start    on every worker: `nohup python3 launch/train.py` (or
              launch/pipeline.py with --pipeline) `--config C --workdir W
              [--multihost] [--config.x=y ...]` in the background, output in
              ~/mimdistill-job.log, pid in ~/mimdistill-job.pid. --multihost
              (jax.distributed.initialize()) is passed on multi-worker slices.
              A job still running there is an error unless --restart.
  6. tail     the log of worker 0 until its job ends (Ctrl-C stops only the
              tail; reattach later with --tail-only).
  7. delete   with --delete-after, the slice once the job on worker 0 ended.

Spot / preemptible slices. Every stage resumes by itself from the latest
checkpoint in its workdir, and the pipeline skips finished stages, so a
preempted run continues when the same command runs again on a new slice:
rerun it with --reuse (a preempted slice is deleted and re-created, the
package re-installed, the job restarted with the same gs:// workdir). With
--resume-loop the launcher does this itself: after the tail ends it checks the
slice and, while it finds it preempted, re-creates it and starts again (at
most --max-restarts times). A multi-worker slice needs a gs:// workdir (every
worker must see the same checkpoints, and a preempted slice loses its disks).

Overrides for the config (`--config.batch_size=1024`, one token each) are
passed through to the job; so is everything after `--`. Multi-worker ssh needs
your key in the agent first: `ssh-add ~/.ssh/google_compute_engine`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runtime images for JAX (https://cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
  "v4": "tpu-ubuntu2204-base",
  "v5p": "v2-alpha-tpuv5",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v6e": "v2-alpha-tpuv6e",
}
# v5e/v6e types count chips and come in these sizes; v4/v5p types count
# TensorCores (2 per chip, 4 chips = 8 cores per worker VM).
CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
TYPE_EXAMPLES = "v4-8, v4-32, v5p-8, v5p-128, v5litepod-16, v6e-8, v6e-64"

REMOTE_TARBALL = "mimdistill-src.tar.gz"
JOB_LOG = "mimdistill-job.log"
JOB_PID = "mimdistill-job.pid"
# The pid file names a live launch/ process (a stale file from before a reboot
# whose pid was reused does not count).
_JOB_RUNNING = f"[ -f {JOB_PID} ] && grep -qs launch/ /proc/$(cat {JOB_PID})/cmdline"
_WAITING_STATES = ("CREATING", "STARTING", "RESTARTING", "REPAIRING")
_DEAD_STATES = ("PREEMPTED", "TERMINATED")


class LaunchError(Exception):
  """A problem with the options or the slice, with the fix in its message."""


@dataclasses.dataclass(frozen=True)
class SliceType:
  family: str  # v4 | v5p | v5litepod | v6e
  size: int  # the number in the accelerator type
  workers: int  # TPU VMs in the slice

  @property
  def multihost(self) -> bool:
    return self.workers > 1


def parse_accelerator_type(value: str) -> SliceType:
  """'v4-32' -> SliceType('v4', 32, workers=4); a clear error otherwise."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", value)
  if m is None:
    hint = ""
    low = value.strip().lower()
    alias = re.fullmatch(r"(v5e|v5lite|v5-lite|v5litepod|v6|v6e|trillium)-?(\d+)", low)
    if alias:
      family = "v6e" if alias.group(1) in ("v6", "v6e", "trillium") else "v5litepod"
      hint = f" (did you mean {family}-{alias.group(2)}? gcloud's name for v5e is v5litepod-N)"
    elif re.fullmatch(r"(v4|v5p)-\d+", low):
      hint = f" (did you mean {low}? types are lower case)"
    elif re.fullmatch(r"v[23]-\d+", low):
      hint = " (v2/v3 are not supported by this launcher)"
    raise LaunchError(
      f"--accelerator-type {value!r} is not a Cloud TPU type this launcher "
      f"knows{hint}. Use <generation>-<size> with generation v4, v5p, "
      f"v5litepod (v5e) or v6e, e.g. {TYPE_EXAMPLES}."
    )
  family, size = m.group(1), int(m.group(2))
  if family in ("v4", "v5p"):
    if size < 8 or size % 8:
      raise LaunchError(
        f"--accelerator-type {value}: {family}-N counts TensorCores, 8 per "
        f"worker VM, so N must be a multiple of 8 ({family}-8, {family}-16, "
        f"{family}-32, ...)."
      )
    workers = size // 8
  else:
    if size not in CHIP_SIZES:
      raise LaunchError(
        f"--accelerator-type {value}: {family}-N counts chips; N must be one "
        f"of {', '.join(map(str, CHIP_SIZES))}."
      )
    workers = 1 if size <= 8 else size // 4  # multi-host slices: 4 chips/VM
  return SliceType(family, size, workers)


def default_version(slice_type: SliceType) -> str:
  return RUNTIME_VERSIONS[slice_type.family]


# ------------------------------------------------------------------ the plan --
@dataclasses.dataclass(frozen=True)
class Step:
  """One command. `unless`: a check whose success skips `argv` (--reuse)."""

  name: str
  argv: tuple[str, ...]
  unless: tuple[str, ...] | None = None

  def shell(self) -> str:
    """The command as one line of POSIX shell, exactly what runs."""
    line = shlex.join(self.argv)
    if self.unless:
      line = f"{shlex.join(self.unless)} > /dev/null 2>&1 || {line}"
    return line


def _gcloud_tpu(verb: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb]


def _where(opts) -> list[str]:
  out = [f"--zone={opts.zone}"]
  if opts.project:
    out.append(f"--project={opts.project}")
  return out


def _ssh(opts, worker: str, command: str) -> tuple[str, ...]:
  return tuple(
    _gcloud_tpu("ssh") + [opts.name] + _where(opts) + [f"--worker={worker}", "--command", command]
  )


def describe_argv(opts) -> tuple[str, ...]:
  return tuple(_gcloud_tpu("describe") + [opts.name] + _where(opts) + ["--format=value(state)"])


def create_argv(opts) -> tuple[str, ...]:
  argv = (
    _gcloud_tpu("create")
    + [opts.name]
    + _where(opts)
    + [f"--accelerator-type={opts.accelerator_type}", f"--version={opts.version}"]
  )
  if opts.spot:
    argv.append("--spot")
  if opts.preemptible:
    argv.append("--preemptible")
  return tuple(argv)


def delete_argv(opts) -> tuple[str, ...]:
  return tuple(_gcloud_tpu("delete") + [opts.name] + _where(opts) + ["--quiet"])


def job_argv(opts) -> list[str]:
  script = "launch/pipeline.py" if opts.pipeline else "launch/train.py"
  argv = [opts.python, script, "--config", opts.config, "--workdir", opts.workdir]
  if opts.slice_type.multihost:
    argv.append("--multihost")
  return argv + list(opts.overrides)


def install_command(opts) -> str:
  d = shlex.quote(opts.remote_dir)
  if opts.git_url:
    fetch = (
      f"rm -rf {d} && git clone --quiet {shlex.quote(opts.git_url)} {d}"
      f" && git -C {d} checkout --quiet {shlex.quote(opts.ref)}"
    )
  else:
    fetch = f"rm -rf {d} && mkdir -p {d} && tar -xzf {REMOTE_TARBALL} -C {d}"
  jax_spec = (
    f'"{opts.jax_spec}"'
    if re.fullmatch(r"[\w.\[\],<>=!~-]+", opts.jax_spec)
    else shlex.quote(opts.jax_spec)
  )
  pip = f"{opts.python} -m pip install --quiet"
  # [gcs]: gcsfs and google-cloud-storage, for the gs:// workdir.
  return f'{fetch} && cd {d} && {pip} -U {jax_spec} && {pip} -e ".[gcs]"'


def start_command(opts) -> str:
  if opts.restart:
    check = (
      f"if {_JOB_RUNNING}; then kill $(cat {JOB_PID}); "
      f"for i in $(seq 60); do {_JOB_RUNNING} || break; sleep 1; done; "
      f"if {_JOB_RUNNING}; then kill -9 $(cat {JOB_PID}); sleep 2; fi; fi"
    )
  else:
    check = (
      f'if {_JOB_RUNNING}; then echo "mimdistill: a job is still '
      f"running on $(hostname) (pid $(cat {JOB_PID})): reattach with "
      f'--tail-only, or stop it with --restart" >&2; exit 3; fi'
    )
  env = "".join(f"export {shlex.quote(kv)} && " for kv in opts.env)
  job = shlex.join(job_argv(opts))
  return (
    f"{check}; (cd {shlex.quote(opts.remote_dir)} && {env}exec nohup {job})"
    f" > {JOB_LOG} 2>&1 < /dev/null & echo $! > {JOB_PID}"
  )


def tail_command() -> str:
  # --pid: the tail ends when the job on this worker ends.
  return f"tail --pid=$(cat {JOB_PID}) -n +1 -F {JOB_LOG}"


def build_plan(opts, *, reuse: bool | None = None, install: bool | None = None) -> list[Step]:
  """The commands, in order. Pure: reads only `opts` (see parse_args).

  `reuse`/`install` override --reuse/--skip-install (the resume loop re-creates
  a preempted slice, which then needs the package again)."""
  if opts.tail_only:
    return [Step("tail", _ssh(opts, "0", tail_command()))]
  reuse = opts.reuse if reuse is None else reuse
  install = (not opts.skip_install) if install is None else install
  plan = []
  if install and not opts.git_url:
    plan.append(
      Step(
        "archive",
        (
          "git",
          "-C",
          str(opts.repo),
          "archive",
          "--format=tar.gz",
          f"--output={opts.tarball}",
          opts.ref,
        ),
      )
    )
  plan.append(Step("create", create_argv(opts), unless=describe_argv(opts) if reuse else None))
  if install:
    if not opts.git_url:
      plan.append(
        Step(
          "copy",
          tuple(
            _gcloud_tpu("scp")
            + [opts.tarball, f"{opts.name}:{REMOTE_TARBALL}"]
            + _where(opts)
            + ["--worker=all"]
          ),
        )
      )
    plan.append(Step("install", _ssh(opts, "all", install_command(opts))))
  plan.append(Step("start", _ssh(opts, "all", start_command(opts))))
  if not opts.no_tail:
    plan.append(Step("tail", _ssh(opts, "0", tail_command())))
  if opts.delete_after:
    plan.append(Step("delete", delete_argv(opts)))
  return plan


# --------------------------------------------------------------- the options --
def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="launch/tpu_pod.py",
    allow_abbrev=False,
    description=__doc__.split("\n\n", 1)[0].split("\n", 1)[0],
    epilog="Overrides: --config.KEY=VALUE (one token each) or anything after "
    "`--` is passed to the job. See the module docstring for details.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  g = p.add_argument_group("slice")
  g.add_argument(
    "--name", default=None, help="TPU VM name (default: mimdistill-<accelerator type>)"
  )
  g.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a")
  g.add_argument(
    "--project", default=None, help="GCP project (default: gcloud's configured project)"
  )
  g.add_argument(
    "--accelerator-type", required=True, help=f"gcloud accelerator type: {TYPE_EXAMPLES}, ..."
  )
  g.add_argument(
    "--version",
    default=None,
    help="TPU runtime image (default inferred from the type: "
    + ", ".join(f"{k} -> {v}" for k, v in RUNTIME_VERSIONS.items())
    + ")",
  )
  cap = g.add_mutually_exclusive_group()
  cap.add_argument("--spot", action="store_true", help="create a Spot slice")
  cap.add_argument("--preemptible", action="store_true", help="create a preemptible slice")
  g.add_argument(
    "--reuse",
    action="store_true",
    help="use the slice if it exists (describe first); a preempted one is deleted and re-created",
  )
  g.add_argument(
    "--resume-loop",
    action="store_true",
    help="when the slice was preempted, re-create it and restart "
    "the job (it resumes from the workdir's checkpoints)",
  )
  g.add_argument(
    "--max-restarts",
    type=int,
    default=20,
    help="--resume-loop gives up after this many re-creations",
  )
  g.add_argument(
    "--delete-after",
    action="store_true",
    help="delete the slice once the job on worker 0 has ended",
  )
  j = p.add_argument_group("job")
  j.add_argument(
    "--config",
    default=None,
    help="config file[:preset], relative to the repository root, "
    "e.g. configs/mae_pretrain.py:base or "
    "configs/pipeline.py:<preset> with --pipeline",
  )
  j.add_argument(
    "--pipeline",
    action="store_true",
    help="run launch/pipeline.py (all stages) instead of launch/train.py (one stage)",
  )
  j.add_argument(
    "--workdir", default=None, help="gs://bucket/path (required on multi-worker slices)"
  )
  j.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="environment for the job, e.g. TFDS_DATA_DIR=gs://b/tfds (repeatable)",
  )
  j.add_argument(
    "--restart", action="store_true", help="stop a job still running on the slice before starting"
  )
  j.add_argument("--python", default="python3", help="python on the workers (default python3)")
  s = p.add_argument_group("package")
  s.add_argument(
    "--git-url",
    default=None,
    help="workers clone this repository instead of receiving a `git archive` of this checkout",
  )
  s.add_argument(
    "--ref", default="HEAD", help="commit/branch/tag to archive or check out (default HEAD)"
  )
  s.add_argument(
    "--tarball", default=None, help="local path of the source tarball (default in $TMPDIR)"
  )
  s.add_argument(
    "--remote-dir",
    default="mimdistill",
    help="directory under the workers' home (default mimdistill)",
  )
  s.add_argument(
    "--jax-spec", default="jax[tpu]", help='pip requirement for JAX (default "jax[tpu]")'
  )
  s.add_argument(
    "--skip-install",
    action="store_true",
    help="do not copy/install (the slice already has the package)",
  )
  a = p.add_argument_group("actions")
  a.add_argument(
    "--no-tail", action="store_true", help="start the job and return without tailing its log"
  )
  a.add_argument(
    "--tail-only", action="store_true", help="only tail the log of worker 0 (reattach)"
  )
  a.add_argument(
    "--dry-run", action="store_true", help="print the exact commands, one per line; run nothing"
  )
  return p


def parse_args(argv: list[str]):
  """Parses and validates; raises LaunchError naming the bad value and the fix."""
  parser = make_parser()
  passthrough = []
  if "--" in argv:
    i = argv.index("--")
    argv, passthrough = argv[:i], argv[i + 1 :]
  opts, unknown = parser.parse_known_args(argv)
  for tok in unknown:
    if not tok.startswith("--config."):
      raise LaunchError(
        f"unknown option {tok!r}; config overrides look like "
        "--config.KEY=VALUE, other job arguments go after `--`"
      )
    if "=" not in tok:
      raise LaunchError(f"{tok!r}: write config overrides as one token, {tok}=VALUE")
  opts.overrides = unknown + passthrough

  opts.slice_type = parse_accelerator_type(opts.accelerator_type)
  opts.version = opts.version or default_version(opts.slice_type)
  opts.name = opts.name or f"mimdistill-{opts.accelerator_type}"
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", opts.name):
    raise LaunchError(
      f"--name {opts.name!r}: TPU names are lower-case letters, "
      "digits and hyphens, start with a letter, at most 63 "
      "characters (e.g. mimdistill-v4-32)"
    )
  if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", opts.zone):
    raise LaunchError(f"--zone {opts.zone!r} is not a zone name such as us-central2-b")
  for kv in opts.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv, re.S):
      raise LaunchError(f"--env {kv!r}: write KEY=VALUE, e.g. TFDS_DATA_DIR=gs://my-bucket/tfds")
  if opts.max_restarts < 0:
    raise LaunchError(f"--max-restarts {opts.max_restarts}: must be >= 0")
  if opts.tail_only and (opts.delete_after or opts.no_tail):
    raise LaunchError("--tail-only only tails; drop --delete-after/--no-tail")
  if opts.delete_after and opts.no_tail:
    raise LaunchError(
      "--delete-after waits for the job by tailing its log; "
      "drop --no-tail (or delete the slice yourself later)"
    )
  if opts.resume_loop and opts.no_tail:
    raise LaunchError("--resume-loop watches the job by tailing its log; drop --no-tail")
  if not re.fullmatch(r"[\w][\w./-]*", opts.remote_dir) or ".." in opts.remote_dir:
    raise LaunchError(
      f"--remote-dir {opts.remote_dir!r}: give a plain path "
      "relative to the workers' home, e.g. mimdistill"
    )
  if opts.git_url and opts.git_url.startswith("git+"):
    opts.git_url = opts.git_url[len("git+") :]
  opts.repo = REPO
  opts.tarball = opts.tarball or os.path.join(
    tempfile.gettempdir(), f"{opts.name}-{REMOTE_TARBALL}"
  )

  if not opts.tail_only:
    if not opts.config:
      raise LaunchError(
        "--config is required, e.g. --config configs/mae_pretrain.py:base, or "
        "--config configs/pipeline.py:<preset> --pipeline for all stages"
      )
    if not opts.workdir:
      raise LaunchError("--workdir is required, e.g. --workdir gs://YOUR_BUCKET/mimdistill/run1")
    if opts.slice_type.multihost and not opts.workdir.startswith("gs://"):
      raise LaunchError(
        f"--workdir {opts.workdir!r}: a {opts.accelerator_type} slice has "
        f"{opts.slice_type.workers} worker VMs, which must all write one "
        "shared workdir; use a GCS path such as "
        "gs://YOUR_BUCKET/mimdistill/run1 (also what a re-created spot slice "
        "resumes from)"
      )
    if os.path.basename(opts.config.split(":", 1)[0]) == "pipeline.py":
      opts.pipeline = True
  return opts


def warnings_for(opts) -> list[str]:
  """Checks that need git or the filesystem; advisory, never fatal."""
  out = []
  if opts.tail_only:
    return out
  transient = opts.spot or opts.preemptible or opts.delete_after
  if transient and not opts.workdir.startswith("gs://"):
    out.append(
      f"--workdir {opts.workdir} is on the slice's disk: it is lost "
      "when the slice is preempted or deleted; use gs://..."
    )
  if opts.git_url or opts.skip_install:
    return out
  config_file = opts.config.split(":", 1)[0]
  try:
    present = (
      subprocess.run(
        ["git", "-C", str(opts.repo), "cat-file", "-e", f"{opts.ref}:{config_file}"],
        capture_output=True,
      ).returncode
      == 0
    )
    dirty = subprocess.run(
      ["git", "-C", str(opts.repo), "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
    ).stdout.strip()
  except OSError:  # no git here: the archive step will say so
    return out
  if not present:
    out.append(
      f"{config_file} is not in {opts.ref} of {opts.repo}: the "
      "workers will not have it (commit it, or fix --config)"
    )
  if dirty and opts.ref == "HEAD":
    out.append(
      "this checkout has uncommitted changes; the workers get HEAD "
      "only (git archive): commit them first"
    )
  return out


# ------------------------------------------------------------------- running --
def _run(step: Step, check: bool = True) -> int:
  print(f"+ {shlex.join(step.argv)}", file=sys.stderr, flush=True)
  try:
    rc = subprocess.call(step.argv)
  except FileNotFoundError:
    what = (
      "git (the source tarball is a `git archive`; or use --git-url)"
      if step.argv[0] == "git"
      else "the Google Cloud CLI (https://cloud.google.com/sdk/docs/install, "
      "then `gcloud auth login`)"
    )
    raise LaunchError(
      f"{step.argv[0]} not found on PATH: install {what}, or "
      "use --dry-run to only print the commands"
    ) from None
  if check and rc != 0:
    hint = " (if the slice exists already, add --reuse)" if step.name == "create" else ""
    raise LaunchError(f"step {step.name!r} failed with exit status {rc}{hint}: {step.shell()}")
  return rc


def slice_state(opts) -> str | None:
  """The slice's state (READY, PREEMPTED, ...), or None when it does not exist."""
  try:
    r = subprocess.run(describe_argv(opts), capture_output=True, text=True)
  except FileNotFoundError:
    raise LaunchError(
      "gcloud not found on PATH: install the Google Cloud CLI or use --dry-run"
    ) from None
  if r.returncode != 0:
    if re.search(r"NOT_FOUND|not found|was not found", r.stderr, re.I):
      return None
    raise LaunchError(f"`{shlex.join(describe_argv(opts))}` failed: {r.stderr.strip()}")
  return r.stdout.strip() or "UNKNOWN"


def ensure_slice(opts, step: Step, poll_s: float = 30.0) -> None:
  """--reuse: create the slice unless it exists and is (or becomes) READY."""
  state = slice_state(opts)
  while state in _WAITING_STATES:
    print(f"slice {opts.name} is {state}; waiting", file=sys.stderr, flush=True)
    time.sleep(poll_s)
    state = slice_state(opts)
  if state == "READY":
    print(f"slice {opts.name} exists and is READY: reusing it", file=sys.stderr)
    return
  if state in _DEAD_STATES:
    print(f"slice {opts.name} is {state}: deleting and re-creating it", file=sys.stderr)
    _run(Step("delete", delete_argv(opts)))
  elif state is not None:
    raise LaunchError(
      f"slice {opts.name} is {state}: start it (`gcloud compute tpus tpu-vm "
      f"start {opts.name} {' '.join(_where(opts))}`) or delete it, then rerun"
    )
  _run(Step("create", step.argv))


def run_round(opts, plan: list[Step]) -> int | None:
  """Runs the plan up to the tail; returns the tail's exit status (None: no tail)."""
  tail_rc = None
  for step in plan:
    if step.name == "delete":
      continue
    if step.unless:
      ensure_slice(opts, step)
    elif step.name == "tail":
      tail_rc = _run(step, check=False)
    else:
      _run(step)
  return tail_rc


def execute(opts) -> int:
  if opts.tail_only:
    return _run(build_plan(opts)[0], check=False)
  restarts = 0
  while True:
    plan = build_plan(
      opts, reuse=opts.reuse or restarts > 0, install=(not opts.skip_install) or restarts > 0
    )
    try:
      tail_rc = run_round(opts, plan)
      failure = None
    except LaunchError as e:
      tail_rc, failure = None, e
    if not opts.resume_loop:
      if failure:
        raise failure
      break
    state = slice_state(opts)
    if state == "READY" and failure is None:
      break  # the job on worker 0 ended (or tail was stopped)
    if state == "READY" or restarts >= opts.max_restarts:
      raise failure or LaunchError(
        f"slice {opts.name} is {state} after {restarts} re-creations "
        "(--max-restarts); rerun the same command to continue"
      )
    restarts += 1
    print(
      f"slice {opts.name} is {state or 'gone'} (preempted): re-creating it "
      f"({restarts}/{opts.max_restarts}); the job resumes from the latest "
      f"checkpoint in {opts.workdir}",
      file=sys.stderr,
      flush=True,
    )
  if opts.delete_after:
    if tail_rc not in (0, None):
      print(
        f"the tail ended with status {tail_rc}; NOT deleting {opts.name} "
        "(the job may still run: --tail-only to reattach)",
        file=sys.stderr,
      )
      return tail_rc
    _run(Step("delete", delete_argv(opts)))
  return tail_rc or 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    opts = parse_args(argv)
    for w in warnings_for(opts):
      print(f"warning: {w}", file=sys.stderr)
    if opts.dry_run:
      print(
        f"# {opts.accelerator_type}: {opts.slice_type.workers} worker VM(s), "
        f"runtime {opts.version}",
        file=sys.stderr,
      )
      for step in build_plan(opts):
        print(step.shell())
      return 0
    return execute(opts)
  except LaunchError as e:
    print(f"tpu_pod.py: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(
      "\ninterrupted: the job keeps running on the slice; reattach with "
      "--tail-only (the slice is not deleted)",
      file=sys.stderr,
    )
    return 130


if __name__ == "__main__":
  sys.exit(main())
