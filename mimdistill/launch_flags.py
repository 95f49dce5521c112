"""The flags and start-up that the launch scripts share (absl flags, an
ml_collections config file with `--config.<field>=` overrides)."""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags


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
  flags.mark_flags_as_required(required)
  return flags.FLAGS


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


def start(level: int = logging.INFO):
  """Logging, then `jax.distributed.initialize()` with --multihost (before
  anything touches the devices); returns the jax module."""
  logging.basicConfig(level=level, format="%(asctime)s %(message)s")
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
    print(
      f"error: expected {positional} positional argument(s), got {len(rest)}: {rest}; see --help",
      file=sys.stderr,
    )
    return None
  return rest
