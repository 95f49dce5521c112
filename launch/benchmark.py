r"""Benchmarks a stage's training step (or its input pipeline) from its config.

  python launch/benchmark.py --config configs/tinymim_distill.py:quickstart --steps 10
  python launch/benchmark.py --config configs/tinymim_distill.py:b_from_l \
      --config.batch_size=128 --config.dtype=bfloat16 \
      --config.student.fused_attention=true --config.teacher.fused_attention=true
  python launch/benchmark.py --config configs/mae_pretrain.py:quickstart \
      --sweep dtype=float32,bfloat16 --sweep model.fused_attention=false,true
  python launch/benchmark.py --config configs/tinymim_distill.py:quickstart --input_only

The step is the stage's own jitted, donated update (same Task, shardings and
mesh as `launch/train.py`), fed one synthetic batch placed with the mesh's
batch sharding, so the figure is the model step, not the input pipeline. A
distillation teacher whose `teacher.source` is empty or missing is randomly
initialised (the output says so); fine-tuning never reads `init.source`.

Prints one JSON line per measurement (each `--sweep` combination), then a
short table. `--input_only` times the stage's real train input pipeline
alone (host batches/s with the configured `data.num_workers`).
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mimdistill import launch_flags  # noqa: E402

FLAGS = launch_flags.define("stage config file[:preset]")
flags.DEFINE_integer("steps", 10, "timed steps (or batches with --input_only)")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_bool("input_only", False, "time the input pipeline alone")
flags.DEFINE_multi_string(
  "sweep",
  [],
  "key=v1,v2: one measurement per value (repeat the flag for "
  "a cartesian product), e.g. --sweep dtype=float32,bfloat16",
)
flags.DEFINE_string("json_out", None, "also append the JSON lines to this file")
flags.DEFINE_bool(
  "calibrate",
  False,
  "measure the device's matmul FLOP/s in the run's dtype first and report each step's "
  "FLOP/s as a fraction of it (MFU calib.), on any device, the CPU included",
)
flags.DEFINE_integer("calibrate_size", 0, "matmul size of --calibrate (0: 2048 CPU, 8192 else)")


def main(argv):
  del argv
  jax = launch_flags.start(logging.WARNING)
  from mimdistill.stages import registry
  from mimdistill.training import benchmark, peak_flops

  benchmark.check_options(
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    calibrate_size=FLAGS.calibrate_size,
    json_out=FLAGS.json_out,
  )
  primary = jax.process_index() == 0
  records = []
  calibrations: dict = {}
  for name, config in benchmark.variants(FLAGS.config, FLAGS.sweep):
    if FLAGS.input_only:
      record = benchmark.measure_input(config, steps=FLAGS.steps, warmup=FLAGS.warmup, variant=name)
    else:
      calibrated = None
      if FLAGS.calibrate:
        if config.dtype not in calibrations:
          calibrations[config.dtype] = peak_flops.calibrate(
            config.dtype, FLAGS.calibrate_size or None
          )
        calibrated = calibrations[config.dtype]
      record = benchmark.measure_step(
        config,
        registry.synthetic,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        variant=name,
        calibrated=calibrated,
      )
    records.append(record)
    if primary:
      line = json.dumps(record)
      print(line, flush=True)
      if FLAGS.json_out:
        with open(FLAGS.json_out, "a", encoding="utf-8") as f:
          f.write(line + "\n")
  if primary:
    print()
    print(benchmark.format_table(records))
    for note in sorted({n for r in records for n in r.get("notes", ())}):
      print(f"note: {note}")


if __name__ == "__main__":
  launch_flags.run(main)
