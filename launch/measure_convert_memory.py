"""Peak memory of checkpoint conversion on a synthetic ViT-H-sized checkpoint.

    python launch/measure_convert_memory.py [--dir /tmp/convert_mem] [--keep]

Writes an official-format `.pth` of a ViT-H/14 encoder (width 1280, depth
32, MLP 5120, 224 px: ~630 M float32 values, ~2.5 GB) with the torch-free
test writer (one tensor in memory at a time), then runs each conversion in a
fresh child process and reports the child's peak RSS (`ru_maxrss`, which
counts resident pages of memory-mapped files too) against the file size:

    .pth -> .safetensors,  .pth -> Orbax,  Orbax -> .safetensors,
    .safetensors -> Orbax,  Orbax -> Orbax

plus the safetensors library's own writer (`save_file`, for the record of
why the converter keeps a streaming writer), and the baseline of a child
that only imports the converter (Python, JAX,
Orbax, tensorstore). The target is a peak below 1.5x the file size. The
files (about 12 GB in all) are deleted at the end unless --keep.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from mimdistill import scratch_folder  # noqa: E402
from mimdistill.interop.pth_writer import write_state_dict  # noqa: E402
from mimdistill.launch_flags import stray_argument  # noqa: E402

WIDTH, DEPTH, PATCH, IMAGE, CHANS = 1280, 32, 14, 224, 3
BLOCK_LEAVES = {
  "norm1.weight": (WIDTH,),
  "norm1.bias": (WIDTH,),
  "attn.qkv.weight": (3 * WIDTH, WIDTH),
  "attn.qkv.bias": (3 * WIDTH,),
  "attn.proj.weight": (WIDTH, WIDTH),
  "attn.proj.bias": (WIDTH,),
  "norm2.weight": (WIDTH,),
  "norm2.bias": (WIDTH,),
  "mlp.fc1.weight": (4 * WIDTH, WIDTH),
  "mlp.fc1.bias": (4 * WIDTH,),
  "mlp.fc2.weight": (WIDTH, 4 * WIDTH),
  "mlp.fc2.bias": (WIDTH,),
}


def vit_h_shapes() -> dict[str, tuple[int, ...]]:
  grid = IMAGE // PATCH
  shapes = {
    "cls_token": (1, 1, WIDTH),
    "pos_embed": (1, 1 + grid * grid, WIDTH),
    "patch_embed.proj.weight": (WIDTH, CHANS, PATCH, PATCH),
    "patch_embed.proj.bias": (WIDTH,),
  }
  for i in range(DEPTH):
    shapes.update({f"blocks.{i}.{k}": v for k, v in BLOCK_LEAVES.items()})
  shapes.update({"norm.weight": (WIDTH,), "norm.bias": (WIDTH,)})
  return shapes


def write_synthetic(path: pathlib.Path) -> int:
  """Writes the checkpoint one tensor at a time; returns the file size."""

  def lazy(i, shape):
    return (
      lambda: np.random.default_rng(i).standard_normal(shape, np.float32) * 0.02,
      shape,
      np.float32,
    )

  state = {name: lazy(i, shape) for i, (name, shape) in enumerate(vit_h_shapes().items())}
  write_state_dict(path, state, extra={"epoch": 399})
  return path.stat().st_size


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from mimdistill.interop.conversion import convert
    src, dst = sys.argv[1], sys.argv[2]
    start = time.time()
    if dst.endswith(".library.safetensors"):
      # The safetensors library's writer, for comparison: it takes the
      # whole state dict and serialises every tensor to bytes before writing.
      from safetensors.numpy import save_file
      from mimdistill.interop.pth_reader import load_pth
      save_file({k: v for k, v in load_pth(src).tensors.items()}, dst)
    elif src != "-":
      convert(src, dst, overwrite=True)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": time.time() - start}))
""")


def run_child(src: str, dst: str) -> dict:
  result = subprocess.run(
    [sys.executable, "-c", CHILD, src, dst], cwd=REPO, capture_output=True, text=True
  )
  if result.returncode:
    raise RuntimeError(f"conversion {src} -> {dst} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def spot_check(pth: pathlib.Path, st: pathlib.Path):
  """A few tensors of the round trip equal the original."""
  from mimdistill.interop.conversion import read_safetensors
  from mimdistill.interop.pth_reader import load_pth

  a = load_pth(pth).tensors
  b, _ = read_safetensors(st)
  assert list(a) == list(b), "names differ"
  for name in (
    "cls_token",
    "blocks.0.attn.qkv.weight",
    "blocks.31.mlp.fc2.weight",
    "patch_embed.proj.weight",
  ):
    assert np.array_equal(a[name], b[name]), name


FLAGS = flags.FLAGS
flags.DEFINE_string("dir", "/tmp/convert_mem", "scratch folder (about 12 GB)")
flags.DEFINE_bool("keep", False, "keep the files")


def main(argv) -> int:
  stray = stray_argument(FLAGS, sys.argv, argv[1:])
  if stray:
    print(f"error: {stray}", file=sys.stderr)
    return 2
  try:
    work = scratch_folder.fresh(FLAGS.dir, "launch/measure_convert_memory.py")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    pth = work / "vit_h.pth"
    t0 = time.time()
    size = write_synthetic(pth)
    print(f"wrote {pth}: {size / 2**30:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
    base = run_child("-", "-")
    print(
      f"{'baseline (imports only)':<28} peak RSS {base['peak_rss'] / 2**30:5.2f} GiB", flush=True
    )
    rows = [
      ("pth -> safetensors", pth, work / "a.safetensors"),
      ("pth -> safetensors (library)", pth, work / "a.library.safetensors"),
      ("pth -> orbax", pth, work / "b_orbax"),
      ("orbax -> safetensors", work / "b_orbax", work / "c.safetensors"),
      ("safetensors -> orbax", work / "a.safetensors", work / "d_orbax"),
      ("orbax -> orbax", work / "b_orbax", work / "e_orbax"),
    ]
    results = {"file_bytes": size, "baseline_peak_rss": base["peak_rss"]}
    for label, src, dst in rows:
      out = run_child(str(src), str(dst))
      ratio = out["peak_rss"] / size
      results[label] = {**out, "ratio": ratio}
      print(
        f"{label:<28} peak RSS {out['peak_rss'] / 2**30:5.2f} GiB = {ratio:.2f} x file "
        f"({out['seconds']:.0f} s)",
        flush=True,
      )
    spot_check(pth, work / "c.safetensors")
    print("round trip .pth -> orbax -> .safetensors: spot-checked tensors equal")
    worst = max(
      v["ratio"] for k, v in results.items() if isinstance(v, dict) and "library" not in k
    )
    print(json.dumps(results))
    print(f"worst peak: {worst:.2f} x the file size (target < 1.5)")
    return 0 if worst < 1.5 else 1
  finally:
    if not FLAGS.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
