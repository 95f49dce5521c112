r"""Runs the whole pipeline (pre-training -> distillation -> fine-tuning).

  python launch/pipeline.py --config configs/pipeline.py:quickstart --workdir workdirs/quickstart

Rerunning the same command skips finished stages and resumes an interrupted
one. On a multi-host pod pass --multihost.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from mimdistill import launch_flags  # noqa: E402

FLAGS = launch_flags.define(
  "pipeline config file[:preset]", "pipeline directory (one subfolder per stage)"
)


def main(argv):
  del argv
  launch_flags.start()
  from mimdistill.stages.pipeline import run_pipeline

  run_pipeline(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  launch_flags.run(main)
