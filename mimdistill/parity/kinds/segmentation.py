"""Kind `segmentation`: TinyMIM's mmseg UperNet (EncoderDecoder with the
BEiT-style backbone, UPerHead and FCNHead) in train mode (neck inputs and
outputs, decode and auxiliary logits, both losses, acc_seg, every gradient,
the BatchNorm running statistics after the step) and in eval mode (running
statistics: neck outputs, logits, logits resized to the image), plus the
mmcv checkpoint's round trip through the Flax trees.

Gradients are compared relative to each tensor's largest magnitude (1e-4),
except the config's `near_zero_grads` (biases whose effect a following
train-mode BatchNorm removes: their exact gradient is 0 and the stored
values are round-off), which get an absolute tolerance of 1e-4 times the
largest gradient of the whole model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop.mmseg_config import loss_weights, segmentor_config
from mimdistill.interop.pth_reader import load_pth
from mimdistill.interop.segmentation_names import flax_to_mmcv, mmcv_to_flax, official_tensors
from mimdistill.models import factory
from mimdistill.objectives.segmentation_loss import segmentation_loss
from mimdistill.parity.report import GRAD_REL_TOL


def nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> jax.Array:
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def checkpoint_name(folder, config) -> str:
  names = sorted(config.get("checkpoints", {})) or sorted(p.name for p in folder.glob("*.pth"))
  return names[0]


def load_segmentor(folder, config, *, dtype=None):
  """(model, numpy variables, checkpoint tensors) of a case's mmcv checkpoint."""
  section = segmentor_config(config["segmentor"])
  tensors = load_pth(folder / checkpoint_name(folder, config)).tensors
  variables, _ = mmcv_to_flax(tensors)
  return factory.build("segmentor", section, dtype=dtype or "float32"), variables, tensors


def _train_step_fn(model, batch_stats, images, labels, weights, ignore_index):
  def loss_fn(params):
    out, state = model.apply(
      {"params": params, "batch_stats": batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
      method=model.with_features,
    )
    heads = {k: v for k, v in out.items() if k in ("decode", "aux")}
    loss, metrics = segmentation_loss(heads, labels, weights=weights, ignore_index=ignore_index)
    return loss, (metrics, out, state["batch_stats"])

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def check(folder, config, report):
  case = folder.name
  model, variables, tensors = load_segmentor(folder, config)
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  images = nhwc(inputs["images"])
  labels = jnp.asarray(inputs["labels"].astype(np.int32))
  ignore_index = int(config.get("ignore_index", 255))
  weights = loss_weights(config["segmentor"])

  exported = flax_to_mmcv(variables)["state_dict"]
  differing = sorted(
    n
    for n in set(exported) | set(tensors)
    if n not in exported or n not in tensors or not np.array_equal(exported[n], tensors[n])
  )
  report.check(
    case, "checkpoint_round_trip", not differing, f"differing: {differing[:8]}" if differing else ""
  )

  params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
  batch_stats = jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"])
  step = _train_step_fn(model, batch_stats, images, labels, weights, ignore_index)
  (loss, (metrics, out, new_stats)), grads = step(params)

  backbone = out["backbone"]
  for i, x in enumerate(backbone["neck_in"]):
    report.compare(case, f"neck_in/{i}", nchw(x), expected[f"neck_in/{i}"])
  for i, x in enumerate(backbone["features"]):
    report.compare(case, f"backbone_out/{i}", nchw(x), expected[f"backbone_out/{i}"])
  report.compare(case, "decode_logits", nchw(out["decode"]), expected["decode_logits"])
  if "aux" in out:
    report.compare(case, "aux_logits", nchw(out["aux"]), expected["aux_logits"])
  report.compare(case, "loss_decode", metrics["loss_decode"], expected["loss_decode"])
  if "loss_aux" in expected.files:
    report.compare(case, "loss_aux", metrics["loss_aux"], expected["loss_aux"])
    unweighted = metrics["loss_aux"] / weights["aux"]
    report.compare(case, "loss_aux_unweighted", unweighted, expected["loss_aux_unweighted"])
  report.compare(case, "loss_total", loss, expected["loss_total"])
  for head in ("decode", "aux"):
    for key in (f"acc_seg_{head}", f"acc_seg_{head}_mmseg011"):
      if key in expected.files:
        got = metrics[key.replace(f"_{head}_mmseg011", f"_mmseg011_{head}")]
        report.compare(case, key, got, expected[key], tol=1e-4)

  got = official_tensors(grads)
  want = {k[len("grad/") :]: expected[k] for k in expected.files if k.startswith("grad/")}
  scale = max(float(np.max(np.abs(v))) for v in want.values())
  near_zero = set(config.get("near_zero_grads", []))
  for name in sorted(set(want) | set(got)):
    if name not in got or name not in want:
      where = "mimdistill" if name in want else "the fixture"
      report.check(case, f"grad/{name}", False, f"missing in {where}")
    elif name in near_zero:
      report.compare(case, f"grad/{name}", got[name], want[name], tol=GRAD_REL_TOL * scale)
    else:
      report.compare_relative(case, f"grad/{name}", got[name], want[name])

  stats = official_tensors(new_stats)
  for key in expected.files:
    if key.startswith("bn_after_train/"):
      name = key[len("bn_after_train/") :]
      tol = 0 if name.endswith("num_batches_tracked") else 1e-5
      if name not in stats:
        report.check(case, key, False, "no such BatchNorm buffer in mimdistill")
      else:
        report.compare(case, key, stats[name], expected[key], tol=tol)

  ev = jax.jit(lambda v, x: model.apply(v, x, train=False, method=model.with_features))(
    {"params": params, "batch_stats": batch_stats}, images
  )
  for i, x in enumerate(ev["backbone"]["features"]):
    key = f"eval/backbone_out/{i}"
    if key in expected.files:
      report.compare(case, key, nchw(x), expected[key])
  report.compare(case, "eval/decode_logits", nchw(ev["decode"]), expected["eval/decode_logits"])
  if "aux" in ev and "eval/aux_logits" in expected.files:
    report.compare(case, "eval/aux_logits", nchw(ev["aux"]), expected["eval/aux_logits"])
  seg = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_decode))(
    {"params": params, "batch_stats": batch_stats}, images
  )
  report.compare(case, "eval/seg_logits", nchw(seg), expected["eval/seg_logits"])
