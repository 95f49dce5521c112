"""The flags, start-up and error handling the launch scripts share (absl
flags, an ml_collections config file with `--config.<field>=` overrides).

`run(main)` replaces `absl.app.run`: a user error (a bad config value or
override, a missing file, a refused checkpoint, a NaN stop) is printed as one
line `error: <message>` with exit status 2, before any compilation where the
stages can check it; `--verbose_errors` shows the traceback instead.

Console output: the project's own log lines (stage headers, warnings), the
progress bars and the summary. Library log lines (Orbax, absl, JAX) go to
`<workdir>/mimdistill.log`; `--verbosity=0` (absl's flag) shows them on the
console again.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

# What a user can cause and fix: config values and overrides, paths, files,
# checkpoints, the data, a diverged run. Anything else is a bug and keeps its
# traceback.
USER_ERRORS = (
  ValueError,
  KeyError,
  OSError,
  FloatingPointError,
  ImportError,
  flags.Error,
)
LOG_FILE = "mimdistill.log"


def define(config_help: str, workdir_help: str | None = None) -> flags.FlagValues:
  """`--config` (file[:preset], locked), `--multihost`, and `--workdir` when
  `workdir_help` is given; the ones defined here are required but
  --multihost."""
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  required = ["config"]
  if workdir_help:
    flags.DEFINE_string("workdir", None, workdir_help)
    required.append("workdir")
  flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
  flags.DEFINE_bool("verbose_errors", False, "show the traceback of an error, not one line")
  flags.mark_flags_as_required(required)
  return flags.FLAGS


def one_line(error: BaseException) -> str:
  """The message of `error` on one line: the last exception line of a message
  that quotes a traceback (config files raise inside absl's flag parsing),
  an ml_collections 'did you mean', newlines joined."""
  while error.__cause__ is not None and "config file" in str(error):
    error = error.__cause__  # ml_collections wraps the real reason
  text = str(error).strip() or type(error).__name__
  quoted = re.findall(r"^\s*(?:[\w.]+(?:Error|Exception)): (.+)$", text, flags=re.M)
  if "Traceback" in text or 'File "' in text:
    text = quoted[-1] if quoted else text.splitlines()[-1]
  if isinstance(error, KeyError) and text.startswith(("'", '"')):
    text = text.strip("'\"")
  text = text.replace("\\n", "\n").replace("\\'", "'")
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if len(lines) == 2 and lines[1].strip("'\"").startswith("Did you mean"):
    field, hint = lines[0].strip("'\""), lines[1].strip("'\"")
    return f"unknown config field {field!r}; {hint[0].lower()}{hint[1:]}"
  return "; ".join(lines)


def unknown_override(argv: list[str]) -> str | None:
  """The first `--config.<path>=` override of `argv` whose path the config
  does not have, named with the fields that are there, or None.

  ml_collections names only the missing key, and suggests a field only for a
  near miss, so `--config.optimizer.lr=1` fails as a bare `'lr'`. The config
  file is loaded a second time for this (as config_flags loads it: the file
  run as a module, `get_config(preset)`); it is cheap and only on an error."""
  import difflib
  import importlib.util
  import os

  spec, overrides = None, []
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config.") :].split("=", 1)[0])
  if not spec or not overrides:
    return None
  path, _, preset = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_error", os.path.abspath(path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
  except Exception:  # the config itself is broken: the original error says more
    return None
  for override in overrides:
    node, parts = config, override.split(".")
    for depth, key in enumerate(parts):
      keys = node.keys() if hasattr(node, "keys") else None
      if keys is None:
        break  # a leaf reached: its value's parse error is ml_collections' to report
      if key not in keys:
        where = "config." + ".".join(parts[:depth]) if depth else spec
        close = difflib.get_close_matches(key, list(keys), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "its fields: " + ", ".join(sorted(keys))
        return f"unknown config field {override!r}: {where} has no {key!r}; {fix}"
      node = node[key]
  return None


def _is_boolean_flag(flag_values: flags.FlagValues, arg: str) -> bool:
  name = arg.lstrip("-")
  if not arg.startswith("-") or "=" in arg or not name:
    return False
  for candidate in (name, name[2:] if name.startswith("no") else None):
    if candidate and candidate in flag_values and flag_values[candidate].boolean:
      return True
  return False


def stray_argument(
  flag_values: flags.FlagValues, argv: list[str], rest: list[str], *, any_left: bool = True
) -> str | None:
  """A message naming an argument of `rest` (those absl left over from
  `argv`, program name excluded) that the script does not take, or None.

  absl reads `--config.model.remat False` as `--config.model.remat` (True)
  and leaves `False` over: the opposite of what was meant, silently, unless
  the leftover is refused. A leftover right after a boolean flag is that
  case and is named first, with the fix; otherwise the first leftover,
  unless `any_left` is False (a command that takes positional arguments)."""
  seen = 0
  for value in rest:
    if value not in argv[seen + 1 :]:
      continue
    seen = argv.index(value, seen + 1)
    before = argv[seen - 1]
    if seen > 1 and _is_boolean_flag(flag_values, before):
      return (
        f"unexpected argument {value!r}: a boolean flag takes no separate value; write "
        f"{before}={value}, with '=' (absl reads {before} alone as True)"
      )
  if rest and any_left:
    forms = "--name=value, --config.<field>=value" if "config" in flag_values else "--name=value"
    return f"unexpected argument {rest[0]!r}; every setting is a flag ({forms})"
  return None


def fail(error: BaseException) -> None:
  print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main) -> None:
  """`absl.app.run(main)` with the project's error handling (module doc)."""

  def parse(argv):
    import os

    for i, arg in enumerate(argv):
      value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
      value = arg.split("=", 1)[1] if arg.startswith("--config=") else value
      if value and not os.path.isfile(value.split(":")[0]):
        print(
          f"error: --config={value}: no such file {value.split(':')[0]!r}; pass a config "
          "file[:preset] such as configs/pipeline.py:quickstart (relative to the repository)",
          file=sys.stderr,
        )
        sys.exit(2)
    try:
      rest = flags.FLAGS(argv)
    except Exception as e:  # anything while parsing: the command line or the config file
      if "--verbose_errors" in argv:
        raise
      if isinstance(e, (KeyError, AttributeError)):
        message = unknown_override(argv)
        if message:
          print(f"error: {message}", file=sys.stderr, flush=True)
          sys.exit(2)
      fail(e)
    # the launch scripts take no positional argument
    message = stray_argument(flags.FLAGS, argv, rest[1:])
    if message:
      print(f"error: {message}", file=sys.stderr, flush=True)
      sys.exit(2)
    return rest

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.verbose_errors:
        raise
      fail(e)

  app.run(wrapped, flags_parser=parse)


def distributed_args(environ=None) -> dict:
  """`jax.distributed.initialize` arguments for the cluster this process runs
  in: on several SkyPilot nodes (GPU clusters) the coordinator is node 0 of
  `SKYPILOT_NODE_IPS`, the process id `SKYPILOT_NODE_RANK`; elsewhere (Cloud
  TPU pods, Slurm, ...) JAX detects them itself (no arguments)."""
  import os

  env = os.environ if environ is None else environ
  nodes = int(env.get("SKYPILOT_NUM_NODES", "1") or 1)
  if nodes <= 1:
    return {}
  ips = [ip for ip in env.get("SKYPILOT_NODE_IPS", "").split() if ip]
  if len(ips) != nodes:
    raise ValueError(
      f"SKYPILOT_NUM_NODES={nodes} but SKYPILOT_NODE_IPS lists {len(ips)} addresses; "
      "start the job through SkyPilot (launch/sky/gpu_nodes.yaml) or set both alike"
    )
  port = env.get("COORDINATOR_PORT", "12355")
  return {
    "coordinator_address": f"{ips[0]}:{port}",
    "num_processes": nodes,
    "process_id": int(env["SKYPILOT_NODE_RANK"]),
  }


class _ProjectOrError(logging.Filter):
  """The console shows the project's records, and others from ERROR up."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.name.startswith("mimdistill") or record.levelno >= logging.ERROR


def configure_logging(workdir: str | None = None, level: int = logging.INFO) -> str | None:
  """Console: the project's log lines at `level`, library lines only from
  ERROR (all of them at absl's --verbosity >= 0); every line at INFO into
  `<workdir>/mimdistill.log` (a local workdir; a bucket workdir logs to the
  console only). Returns the log file's path."""
  import os

  verbose = flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  root.setLevel(logging.INFO)
  console = logging.StreamHandler(sys.stderr)
  console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  console.setLevel(logging.INFO if verbose else level)
  if not verbose:
    console.addFilter(_ProjectOrError())
  root.addHandler(console)
  logging.getLogger("mimdistill").setLevel(min(level, logging.INFO))
  path = None
  if workdir and "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOG_FILE)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
  return path


def start(level: int = logging.INFO):
  """Logging (see `configure_logging`), the host allocator settings of a CPU
  run (`host_allocator`, before JAX starts its threads), then
  `jax.distributed.initialize()` with --multihost (before anything touches
  the devices); returns the jax module."""
  from mimdistill import host_allocator
  from mimdistill.paths import check_workdir

  workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
  if workdir is not None:
    check_workdir(workdir)  # before the log file is opened in it
  configure_logging(workdir, level)
  logging.getLogger(__name__).debug("host malloc: %s", host_allocator.keep_freed_memory())
  import jax

  if flags.FLAGS.multihost:
    jax.distributed.initialize(**distributed_args())
  return jax


def parse_command_line(
  flag_values: flags.FlagValues, argv: list[str], usage: str, *, positional: int | None
) -> list[str] | None:
  """Parses `argv` (program name first) into `flag_values`, a command's own
  absl `FlagValues`; returns the `positional` arguments, or None after
  printing the usage (--help) or a one-line error naming the bad argument."""
  import sys

  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
    print(usage.rstrip() + "\n\nflags:\n" + flag_values.main_module_help(), file=sys.stdout)
    return None
  flag_values.unparse_flags()  # a second call (tests, notebooks) starts from the defaults
  try:
    rest = flag_values(argv)[1:]
  except flags.Error as e:
    print(f"error: {e}; see --help", file=sys.stderr)
    return None
  if positional is not None and len(rest) != positional:
    stray = stray_argument(flag_values, argv, rest, any_left=False)
    print(
      f"error: expected {positional} positional argument(s), got {len(rest)}: {rest}; "
      f"{stray + '; ' if stray else ''}see --help",
      file=sys.stderr,
    )
    return None
  return rest
