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


def start(level: int = logging.INFO):
  """Logging, then `jax.distributed.initialize()` with --multihost (before
  anything touches the devices); returns the jax module."""
  logging.basicConfig(level=level, format="%(asctime)s %(message)s")
  import jax

  if flags.FLAGS.multihost:
    jax.distributed.initialize()
  return jax
