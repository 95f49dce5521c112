"""Convert ViT checkpoints between official PyTorch files and mimdistill.

    python -m mimdistill.convert SRC DST [--num_heads=N] [--layout=L] ...

SRC: an official MAE / TinyMIM / timm `.pth` (read safely, without torch and
without running pickle code), a `.safetensors` file with the same names, or
a mimdistill workdir (`W`, `W:step`, or `W/best`: a fine-tuning or
segmentation stage's best evaluated step) / Orbax checkpoint folder.
DST: `*.safetensors` -> official / timm names (loads with `strict=True` in
the official code and timm); `*.pth` -> the same as a torch checkpoint
(`{'model': ...}`; a segmentor's is mmcv's `{'meta', 'state_dict'}`),
written without torch; anything else -> a folder every stage reads as
a teacher or init (`--config.teacher.source=DST`), see
`mimdistill.interop.conversion`.

Examples:
    python -m mimdistill.convert mae_pretrain_vit_large.pth W/mae_l
    python -m mimdistill.convert W/mae_l mae_l.safetensors
    python -m mimdistill.convert tinymim_vit_tiny.pth W/t --num_heads=3
    python -m mimdistill.convert upernet_tinymim_b.pth W/seg     # a whole mmseg segmentor
    python -m mimdistill.convert W/seg upernet.safetensors        # back to mmcv names
    python -m mimdistill.convert W/ft/best student_best.pth       # the best step, for torch

The detected model and a report of the tensors used, skipped and missing
are printed; what is not in the weights (attention heads) is assumed from
the standard width and said so, with the flag that overrides it (flags use underscores: --num_heads=N).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from mimdistill.interop.layouts import LAYOUTS, POS_EMBED_TYPES
from mimdistill.launch_flags import parse_command_line

FLAGS = flags.FlagValues()
flags.DEFINE_integer(
  "num_heads",
  None,
  "attention heads of the encoder (not stored in the weights; default: the standard "
  "value for the width)",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "decoder_num_heads", None, "attention heads of an MAE decoder (default 16)", flag_values=FLAGS
)
flags.DEFINE_enum(
  "layout", None, LAYOUTS, "default: detected; 'vit' keeps only the encoder", flag_values=FLAGS
)
flags.DEFINE_integer(
  "image_size", None, "only for checkpoints without pos_embed (default 224)", flag_values=FLAGS
)
flags.DEFINE_enum(
  "pos_embed",
  None,
  POS_EMBED_TYPES,
  "learned param or fixed sin-cos buffer (default: learned for classifiers, else fixed)",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "key",
  None,
  "top-level key of the .pth holding the weights (default: model, state_dict, module, or "
  "the top level)",
  flag_values=FLAGS,
)
flags.DEFINE_bool(
  "allow_unknown",
  False,
  "drop tensors mimdistill's ViT has no place for instead of refusing",
  flag_values=FLAGS,
)
flags.DEFINE_list(
  "out_indices",
  None,
  "a segmentor's backbone out_indices, e.g. 3,5,7,11 (not stored in the weights; default: "
  "TinyMIM's for the depth)",
  flag_values=FLAGS,
)
flags.DEFINE_bool(
  "overwrite",
  False,
  "replace an existing DST: a file, an earlier conversion or an empty folder (never another "
  "folder, e.g. a training workdir)",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "report_json", None, "also write the report as JSON to this file", flag_values=FLAGS
)


def main(argv=None) -> int:
  """`argv`: the arguments after the program name (default: sys.argv's)."""
  argv = ["python -m mimdistill.convert", *(sys.argv[1:] if argv is None else argv)]
  paths = parse_command_line(FLAGS, argv, __doc__, positional=2)
  if paths is None:
    return 0 if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv) else 2
  src, dst = paths
  try:
    out_indices = [int(i) for i in FLAGS.out_indices] if FLAGS.out_indices else None
  except ValueError:
    print(
      f"convert: error: --out_indices={','.join(FLAGS.out_indices)} must be block indices "
      "(0-based integers), e.g. --out_indices=3,5,7,11",
      file=sys.stderr,
    )
    return 2
  # Checked first: the conversion of a large checkpoint is done by the time
  # the report is written.
  report_dir = os.path.dirname(os.path.abspath(FLAGS.report_json)) if FLAGS.report_json else ""
  if report_dir and not os.path.isdir(report_dir):
    print(
      f"convert: error: --report_json={FLAGS.report_json}: folder {report_dir} does not "
      "exist; create it or write the report elsewhere",
      file=sys.stderr,
    )
    return 2
  from absl import logging as absl_logging  # Orbax's read-only notices are noise here

  absl_logging.set_verbosity(absl_logging.ERROR)
  # Imported here so `--help` is instant.
  from mimdistill.interop.conversion import convert
  from mimdistill.interop.layouts import LayoutError
  from mimdistill.interop.pth_reader import CheckpointReadError

  try:
    report = convert(
      src,
      dst,
      layout=FLAGS.layout,
      num_heads=FLAGS.num_heads,
      image_size=FLAGS.image_size,
      decoder_num_heads=FLAGS.decoder_num_heads,
      pos_embed=FLAGS.pos_embed,
      key=FLAGS.key,
      allow_unknown=FLAGS.allow_unknown,
      overwrite=FLAGS.overwrite,
      out_indices=out_indices,
    )
  except (
    CheckpointReadError,
    LayoutError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    KeyError,
    ValueError,
  ) as exc:
    print(f"convert: error: {exc}", file=sys.stderr)
    return 2
  print(report)
  if FLAGS.report_json:
    with open(FLAGS.report_json, "w") as f:
      json.dump(report.to_json(), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
