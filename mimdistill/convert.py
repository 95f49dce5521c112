"""Convert ViT checkpoints between official PyTorch files and mimdistill.

    python -m mimdistill.convert SRC DST [--num-heads N] [--layout L] ...

SRC: an official MAE / TinyMIM / timm `.pth` (read safely, without torch and
without running pickle code), a `.safetensors` file with the same names, or
a mimdistill workdir (`W`, `W:step`) / Orbax checkpoint folder.
DST: `*.safetensors` -> official / timm names (loads with `strict=True` in
the official code and timm); anything else -> a folder every stage reads as
a teacher or init (`--config.teacher.source=DST`), see
`mimdistill.interop.convert`.

Examples:
    python -m mimdistill.convert mae_pretrain_vit_large.pth W/mae_l
    python -m mimdistill.convert W/mae_l mae_l.safetensors
    python -m mimdistill.convert tinymim_vit_tiny.pth W/t --num-heads 3

The detected model and a report of the tensors used, skipped and missing
are printed; what is not in the weights (attention heads) is assumed from
the standard width and said so, with the flag that overrides it.
"""

from __future__ import annotations

import argparse
import json
import sys

from mimdistill.interop.layouts import LAYOUTS, POS_EMBED_TYPES


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m mimdistill.convert",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
  )
  parser.add_argument("src", help=".pth / .safetensors file, workdir[:step] or Orbax folder")
  parser.add_argument("dst", help="*.safetensors file, or a folder for an Orbax checkpoint")
  parser.add_argument(
    "--num-heads",
    type=int,
    default=None,
    help="attention heads of the encoder (not stored in the weights; "
    "default: the standard value for the width)",
  )
  parser.add_argument(
    "--decoder-num-heads",
    type=int,
    default=None,
    help="attention heads of an MAE decoder (default 16)",
  )
  parser.add_argument(
    "--layout",
    choices=LAYOUTS,
    default=None,
    help="default: detected; 'vit' keeps only the encoder",
  )
  parser.add_argument(
    "--image-size",
    type=int,
    default=None,
    help="only for checkpoints without pos_embed (default 224)",
  )
  parser.add_argument(
    "--pos-embed",
    choices=POS_EMBED_TYPES,
    default=None,
    help="learned param or fixed sin-cos buffer (default: learned for classifiers, else fixed)",
  )
  parser.add_argument(
    "--key",
    default=None,
    help="top-level key of the .pth holding the weights (default: model, "
    "state_dict, module, or the top level)",
  )
  parser.add_argument(
    "--allow-unknown",
    action="store_true",
    help="drop tensors mimdistill's ViT has no place for instead of refusing",
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  parser.add_argument(
    "--report-json", default=None, help="also write the report as JSON to this file"
  )
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from absl import logging as absl_logging  # Orbax's read-only notices are noise here

  absl_logging.set_verbosity(absl_logging.ERROR)
  # Imported here so `--help` is instant.
  from mimdistill.interop.convert import convert
  from mimdistill.interop.layouts import LayoutError
  from mimdistill.interop.pth_reader import CheckpointReadError

  try:
    report = convert(
      args.src,
      args.dst,
      layout=args.layout,
      num_heads=args.num_heads,
      image_size=args.image_size,
      decoder_num_heads=args.decoder_num_heads,
      pos_embed=args.pos_embed,
      key=args.key,
      allow_unknown=args.allow_unknown,
      overwrite=args.overwrite,
    )
  except (
    CheckpointReadError,
    LayoutError,
    FileExistsError,
    FileNotFoundError,
    IsADirectoryError,
    KeyError,
  ) as exc:
    print(f"convert: error: {exc}", file=sys.stderr)
    return 2
  print(report)
  if args.report_json:
    with open(args.report_json, "w") as f:
      json.dump(report.to_json(), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
