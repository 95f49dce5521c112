r"""Runs one stage from a config file.

  python launch/train.py --config configs/mae_pretrain.py:quickstart --workdir W
  python launch/train.py --config configs/mae_pretrain.py:base --workdir gs://b/w \
      --config.batch_size=1024 --config.total_epochs=400

A rerun with the same --workdir resumes from the latest checkpoint. On a
multi-host pod pass --multihost (calls jax.distributed.initialize()).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from mimdistill import launch_flags  # noqa: E402

FLAGS = launch_flags.define("stage config file[:preset]", "output/resume directory for this stage")


def main(argv):
  del argv
  jax = launch_flags.start()
  from mimdistill.stages import registry

  summary = registry.run_stage(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print({k: v for k, v in summary.items()})


if __name__ == "__main__":
  launch_flags.run(main)
