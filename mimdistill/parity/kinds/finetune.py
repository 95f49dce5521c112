"""Kind `finetune`: logits of the official `models_vit.VisionTransformer`, the
layer-wise lr-decay / weight-decay table, and logits after loading at another
resolution (bicubic position-embedding resize)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop.official_names import official_names_of, official_to_flax
from mimdistill.interop.pth_reader import load_pth
from mimdistill.models import factory
from mimdistill.models.classifier import ViTClassifier
from mimdistill.models.pos_embed import resize_pos_embed
from mimdistill.parity import official_args
from mimdistill.training.optimizer import decay_mask, layer_scales

# MAE main_finetune: `model_without_ddp.no_weight_decay()`.
FINETUNE_NO_DECAY = ("pos_embed", "cls_token")


def classifier_from_official_args(args: dict, image_size: int | None = None) -> ViTClassifier:
  section = official_args.vit_section(args, global_pool=bool(args.get("global_pool", True)))
  if image_size:
    section["image_size"] = image_size
  return factory.build("classifier", section, num_classes=args["num_classes"])


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def check(folder, config, report):
  case = folder.name
  args = config["model"]
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  ckpt = sorted(config.get("checkpoints", {}) or [p.name for p in folder.glob("*.pth")])[0]
  variables, _ = official_to_flax(
    load_pth(folder / ckpt).tensors, "classifier", learned_pos_embed=True
  )

  model = classifier_from_official_args(args)
  logits = jax.jit(model.apply)(variables, _nhwc(inputs["images"]))
  report.compare(case, "logits", logits, expected["logits"])

  if "param_groups" in config:
    params = variables["params"]
    decay = float(config["layer_decay"])
    wd = float(config.get("weight_decay", 0.05))
    scales = official_names_of({"params": layer_scales(params, args["depth"], decay)}, "classifier")
    decays = official_names_of({"params": decay_mask(params, FINETUNE_NO_DECAY)}, "classifier")
    got = {n: (float(scales[n]), wd if decays[n] else 0.0) for n in scales}
    want = {n: (g["lr_scale"], g["weight_decay"]) for n, g in config["param_groups"].items()}
    missing = sorted(set(want) ^ set(got))
    report.check(
      case, "param_groups:names", not missing, f"differing names: {missing}" if missing else ""
    )
    common = sorted(set(want) & set(got))
    report.compare(
      case,
      "param_groups:lr_scale",
      [got[n][0] for n in common],
      [want[n][0] for n in common],
      tol=1e-12,
    )
    report.compare(
      case,
      "param_groups:weight_decay",
      [got[n][1] for n in common],
      [want[n][1] for n in common],
      tol=0,
    )

  if "resized_img_size" in config:
    size = int(config["resized_img_size"])
    resized = classifier_from_official_args(args, image_size=size)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    pos = params["encoder"]["pos_embed"]
    params["encoder"]["pos_embed"] = resize_pos_embed(pos, size // args["patch_size"])
    report.compare(
      case, "pos_embed_resized", params["encoder"]["pos_embed"], expected["pos_embed_resized"]
    )
    logits = jax.jit(resized.apply)({"params": params}, _nhwc(inputs["images_resized"]))
    report.compare(case, "logits_resized", logits, expected["logits_resized"])
