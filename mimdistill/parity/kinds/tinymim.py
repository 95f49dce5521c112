"""Kind `tinymim`: teacher and student Q-K / V-V relations, both KL losses,
every student gradient, and which student parameters get no gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop.official_names import flax_to_official, official_to_flax
from mimdistill.interop.pth_reader import load_pth
from mimdistill.models import factory
from mimdistill.models.vit import ViTEncoder
from mimdistill.objectives.relations import relation_losses, relations
from mimdistill.parity import official_args


def encoder_from_official_args(args: dict) -> ViTEncoder:
  return factory.build("encoder", official_args.vit_section(args))


def _load(folder, name):
  variables, _ = official_to_flax(load_pth(folder / name).tensors, "vit")
  return jax.tree_util.tree_map(jnp.asarray, variables)


def check(folder, config, report):
  case = folder.name
  t_args, s_args = config["teacher"], config["student"]
  t_block = int(t_args["intermediate"])
  s_block = int(config.get("student_relation_block", s_args["depth"]))
  # Official: the student's relation block is built with `last_heads` heads,
  # and the teacher block with its own heads; both must agree for the KL.
  heads = int(s_args.get("last_heads", t_args["num_heads"]))
  teacher = encoder_from_official_args(t_args)
  student = encoder_from_official_args(s_args)
  t_vars = _load(folder, "teacher.pth")
  s_vars = _load(folder, "student.pth")
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  images = jnp.asarray(inputs["images"].transpose(0, 2, 3, 1))
  t_images = images
  if "teacher_images" in inputs:
    t_images = jnp.asarray(inputs["teacher_images"].transpose(0, 2, 3, 1))

  t_qkv = teacher.apply(
    t_vars, t_images, block=t_block, heads=int(t_args["num_heads"]), method=ViTEncoder.relation_qkv
  )
  t_rel = relations(t_qkv)

  def loss_fn(params):
    s_qkv = student.apply(
      {"params": params, "fixed": s_vars["fixed"]},
      images,
      block=s_block,
      heads=heads,
      method=ViTEncoder.relation_qkv,
    )
    s_rel = relations(s_qkv)
    losses = relation_losses(t_rel, s_rel)
    return losses["qk"] + losses["vv"], (losses, s_rel)

  (_, (losses, s_rel)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(s_vars["params"])
  for who, rel in (("teacher", t_rel), ("student", s_rel)):
    for name in ("qk", "vv"):
      report.compare(
        case, f"{who}_{name}", jax.nn.softmax(rel[name], axis=-1), expected[f"{who}_{name}"]
      )
  report.compare(case, "qk_loss", losses["qk"], expected["qk_loss"])
  report.compare(case, "vv_loss", losses["vv"], expected["vv_loss"])

  got = flax_to_official({"params": jax.device_get(grads)}, "vit")
  want = {k[len("grad/") :]: expected[k] for k in expected.files if k.startswith("grad/")}
  for name in sorted(want):
    if name not in got:
      report.check(case, f"grad/{name}", False, "no such parameter in mimdistill")
    else:
      report.compare_relative(case, f"grad/{name}", got[name], want[name])

  # "No gradient": a fixed buffer, or a param whose gradient is exactly zero.
  official_names = set(flax_to_official(s_vars, "vit"))
  no_grad = sorted(n for n in official_names if n not in got or not np.any(got[n]))
  listed = sorted(config.get("params_without_grad", []))
  report.check(
    case,
    "params_without_grad",
    no_grad == listed,
    "" if no_grad == listed else f"mimdistill: {no_grad}; official: {listed}",
  )
