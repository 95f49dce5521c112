r"""Runs one stage from a config file.

  python launch/train.py --config configs/mae_pretrain.py:quickstart --workdir W
  python launch/train.py --config configs/mae_pretrain.py:base --workdir gs://b/w \
      --config.batch_size=1024 --config.total_epochs=400

A rerun with the same --workdir resumes from the latest checkpoint. On a
multi-host pod pass --multihost (calls jax.distributed.initialize()).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "stage config file[:preset]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output/resume directory for this stage")
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() first")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  import jax
  if FLAGS.multihost:
    jax.distributed.initialize()
  from mimdistill.stages import registry
  summary = registry.run_stage(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print({k: v for k, v in summary.items()})


if __name__ == "__main__":
  app.run(main)
