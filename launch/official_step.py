r"""Times the official TinyMIM distillation step (PyTorch) for a side-by-side
comparison with `launch/benchmark.py`.

  python launch/official_step.py --official_dir=/path/to/TinyMIM --preset=s_from_b --batch_size=4

`--official_dir` is a checkout of OliverRensu/TinyMIM (its `models_teacher`,
`models_tinymim`, `vit` and `util` are imported from there; torch and timm
must be installed). The step is `engine_pretrain.train_one_epoch`'s body on
a random batch: the frozen teacher under `no_grad` up to its target block,
the student's Q-K / V-V relation KL, backward, AdamW with the official
weight-decay groups (1-D params undecayed). On a CPU it runs in float32
(`torch.cuda.amp.autocast` does nothing there), as the benchmark's fp32
row. Prints one JSON line with the median step time and img/s, the same
fields `launch/benchmark.py` prints. It runs in the official code's
environment (torch, timm), so its flags are argparse's, not absl's.
"""

import argparse
import json
import os
import statistics
import sys
import time

# preset -> (official teacher constructor, official student constructor), as
# configs/tinymim_distill.py names them. (The official repository has no
# 12-relation-head ViT-S teacher constructor for t_from_s.)
PRESETS = {
  "b_from_l": ("mae_vit_large", "tinymim_vit_base_patch16"),
  "s_from_b": ("mae_vit_base", "tinymim_vit_small_patch16"),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--official_dir", required=True, help="checkout of OliverRensu/TinyMIM")
  parser.add_argument("--preset", default="s_from_b", choices=list(PRESETS))
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
  parser.add_argument("--json_out", default=None, help="also append the JSON line here")
  args = parser.parse_args(argv)
  for name, low in (
    ("batch_size", 1),
    ("image_size", 16),
    ("steps", 1),
    ("warmup", 0),
    ("threads", 0),
  ):
    if getattr(args, name) < low:
      parser.error(f"--{name}={getattr(args, name)} must be >= {low}")
  if args.image_size % 16:
    parser.error(f"--image_size={args.image_size} must be a multiple of the patch size 16")
  if not os.path.isfile(os.path.join(args.official_dir, "models_tinymim.py")):
    parser.error(
      f"--official_dir={args.official_dir} has no models_tinymim.py; pass a TinyMIM checkout"
    )
  return args


def main(argv=None):
  FLAGS = parse_args(argv)
  sys.path.insert(0, FLAGS.official_dir)
  import numpy as np

  if not hasattr(np, "float"):  # util/pos_embed.py uses np.float (removed in numpy 1.24)
    np.float = float
  import models_teacher
  import models_tinymim
  import torch

  if FLAGS.threads:
    torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  teacher_name, student_name = PRESETS[FLAGS.preset]
  teacher = getattr(models_teacher, teacher_name)().eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  student = getattr(models_tinymim, student_name)().train()
  decay, no_decay = [], []
  for name, p in student.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
  optimizer = torch.optim.AdamW(
    [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
    lr=1e-4,
    betas=(0.9, 0.95),
  )
  b, s = FLAGS.batch_size, FLAGS.image_size
  images = torch.randn(b, 3, s, s)

  def step():
    with torch.no_grad():
      teacher_out = teacher(images)
    qk_loss, vv_loss = student(images, teacher_out)
    loss = qk_loss + vv_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach().item()

  for _ in range(FLAGS.warmup):
    step()
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  record = {
    "impl": "official",
    "preset": FLAGS.preset,
    "batch_size": b,
    "image_size": s,
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "step_ms_p50": round(1e3 * median, 1),
    "img_per_s": round(b / median, 2),
  }
  line = json.dumps(record)
  print(line)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
