"""Kind `mae`: encoder latent, mask, ids_restore, prediction, loss and every
gradient of the official MaskedAutoencoderViT, for a given masking noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop.official_names import flax_to_official, official_to_flax
from mimdistill.interop.pth_reader import load_pth
from mimdistill.models import factory
from mimdistill.models.mae import patchify
from mimdistill.objectives.mae_loss import mae_loss
from mimdistill.parity import official_args


def check(folder, config, report):
  case = folder.name
  args = config["model"]
  model = factory.build("mae", official_args.mae_section(args))
  patch = model.encoder.patch_size
  norm_pix = bool(args.get("norm_pix_loss", False))
  mask_ratio = float(config["mask_ratio"])
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  images = jnp.asarray(inputs["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  noise = jnp.asarray(inputs["noise"])

  checkpoints = sorted(config.get("checkpoints", {})) or sorted(
    p.name for p in folder.glob("*.pth")
  )
  trees = []
  for name in checkpoints:
    variables, _ = official_to_flax(load_pth(folder / name).tensors, "mae")
    trees.append((name, variables))
  # Every checkpoint of the case must hold the same weights (e.g. the
  # training-style file wraps the same state dict).
  for name, params in trees[1:]:
    same = jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, trees[0][1]))
    report.check(case, f"{name}:same_weights_as:{trees[0][0]}", bool(same))
  variables = jax.tree_util.tree_map(jnp.asarray, trees[0][1])
  params, fixed = variables["params"], variables["fixed"]

  def loss_fn(p):
    out = model.apply({"params": p, "fixed": fixed}, images, noise, mask_ratio)
    return mae_loss(out.pred, images, out.masking.mask, patch, norm_pix), out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  report.compare(case, "latent", out.latent, expected["latent"])
  report.compare(case, "mask", out.masking.mask, expected["mask"])
  report.compare(case, "ids_restore", out.masking.ids_restore, expected["ids_restore"], tol=0)
  report.compare(case, "pred", out.pred, expected["pred"])
  if "patchified_images" in expected:
    report.compare(
      case, "patchified_images", patchify(images, patch), expected["patchified_images"]
    )
  report.compare(case, "loss", loss, expected["loss"])

  got = flax_to_official({"params": jax.device_get(grads)}, "mae")
  want = {k[len("grad/") :]: expected[k] for k in expected.files if k.startswith("grad/")}
  for name in sorted(set(want) | set(got)):
    if name not in got:
      report.check(case, f"grad/{name}", False, "no such parameter in mimdistill")
    elif name not in want:
      report.check(case, f"grad/{name}", False, "not in the fixture")
    else:
      report.compare_relative(case, f"grad/{name}", got[name], want[name])
