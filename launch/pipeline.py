r"""Runs the whole pipeline (pre-training -> distillation -> fine-tuning).

  python launch/pipeline.py --config configs/pipeline.py:quickstart --workdir workdirs/quickstart

Rerunning the same command skips finished stages and resumes an interrupted
one. On a multi-host pod pass --multihost.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "pipeline config file[:preset]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "pipeline directory (one subfolder per stage)")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  from mimdistill.stages.pipeline import run_pipeline
  run_pipeline(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
