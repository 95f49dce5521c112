"""Kind `clip_visual`: the CLIP image tower CAE v2 uses as its teacher (Atten4Vis/CAE's
bundled OpenAI CLIP code): conv1 output, tokens after ln_pre, each block, ln_post, proj
and their L2 normalisation, the bilinear position-embedding resize and the tower at
that resolution, the released files' float16 / float32 split, and the normalisation
constants."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimdistill.interop.clip_names import clip_visual_to_flax, flax_to_clip_visual
from mimdistill.interop.torchscript_reader import read_torch_file
from mimdistill.models.clip import (
  CLIP_MEAN,
  CLIP_STD,
  ClipVisual,
  l2_normalize,
  resize_positional_embedding,
)


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _checkpoint(folder, config) -> str:
  names = [n for n in config.get("checkpoint", {}) if (folder / n).is_file()]
  names = names or sorted(p.name for p in folder.glob("*.pt*"))
  return names[0]


def check_dtypes(case, report, tensors, dtypes: dict) -> None:
  """The file's float16 / float32 split is the released one."""
  wrong = {n: (str(tensors[n].dtype), d) for n, d in dtypes.items() if n in tensors}
  wrong = {n: v for n, v in wrong.items() if v[0] != v[1]}
  missing = sorted(n for n in dtypes if n not in tensors)
  report.check(
    case,
    "checkpoint:dtypes",
    not wrong and not missing,
    f"differing {wrong}, missing {missing}" if wrong or missing else "",
  )


def check(folder, config, report):
  case = folder.name
  args = config["model"]
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  name = _checkpoint(folder, config)
  ckpt = read_torch_file(folder / name)
  if "dtypes" in config.get("checkpoint", {}):
    check_dtypes(case, report, ckpt.tensors, config["checkpoint"]["dtypes"])
  params, spec, _, _ = clip_visual_to_flax(ckpt.tensors, heads=int(args["heads"]), what=name)
  built = {
    "width": spec.width,
    "layers": spec.layers,
    "patch_size": spec.patch_size,
    "input_resolution": spec.image_size,
    "output_dim": spec.output_dim,
  }
  differ = {k: (v, args[k]) for k, v in built.items() if k in args and args[k] != v}
  report.check(
    case, "architecture_from_shapes", not differ, f"inferred vs config: {differ}" if differ else ""
  )
  back = flax_to_clip_visual(params)
  same = sorted(back) == sorted(n for n in ckpt.tensors if n.startswith("visual.")) and all(
    np.array_equal(back[n], np.asarray(ckpt.tensors[n], np.float32)) for n in back
  )
  report.check(case, "names_round_trip", same)

  tower = ClipVisual(**spec.module_kwargs())
  out = jax.jit(tower.apply)({"params": params}, _nhwc(inputs["images"]))
  got = {
    "patch_embed": out.patch_embed,
    "after_ln_pre": out.after_ln_pre,
    "tokens_ln_post": out.tokens_ln_post,
    "tokens_proj": out.tokens_proj,
    "tokens_proj_l2": l2_normalize(out.tokens_proj),
  }
  got.update({f"block{i}_out": x for i, x in enumerate(out.blocks)})
  for key in sorted(got):
    if key in expected:
      report.compare(case, key, got[key], expected[key])
  for key in sorted(k for k in expected.files if k.startswith("block") and k not in got):
    report.check(case, key, False, "no such block in mimdistill's tower")

  if "resized/positional_embedding" in expected:
    rows = expected["resized/positional_embedding"].shape[0] - 1
    grid = math.isqrt(rows)
    resized = dict(params)
    resized["positional_embedding"] = resize_positional_embedding(
      params["positional_embedding"], grid
    )
    report.compare(
      case,
      "resized/positional_embedding",
      resized["positional_embedding"],
      expected["resized/positional_embedding"],
    )
    tower_r = ClipVisual(**spec.module_kwargs(image_size=grid * spec.patch_size))
    out_r = jax.jit(tower_r.apply)({"params": resized}, _nhwc(inputs["images_resized"]))
    report.compare(case, "resized/tokens_proj", out_r.tokens_proj, expected["resized/tokens_proj"])

  norm = config.get("normalisation", {})
  for key, ours in (
    ("clip_mean", CLIP_MEAN),
    ("clip_std", CLIP_STD),
    ("imagenet_mean", IMAGENET_MEAN),
    ("imagenet_std", IMAGENET_STD),
  ):
    if key in norm:
      report.compare(case, f"normalisation:{key}", np.asarray(ours, np.float64), norm[key], 1e-7)
  for pixels, images in (("pixels_uint8", "images"), ("pixels_uint8_resized", "images_resized")):
    if pixels in inputs and images in inputs:
      mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
      std = np.asarray(CLIP_STD, np.float32)[:, None, None]
      ours = (inputs[pixels].astype(np.float32) / 255.0 - mean) / std
      report.compare(case, f"clip_normalised:{images}", ours, inputs[images])
