"""Kind `spark`: one train-mode SparK forward/backward (keyu-tian/SparK
`SparK.forward(images, active_b1ff)`, `loss.backward()`): encoder features,
densified maps, decoder blocks, reconstruction, per-patch mse, loss, every
gradient and the BN running statistics after the step, all keyed by SparK
names; plus the import/export round trip of SparK's checkpoint layout.

The encoder (ResNet or ConvNeXt, any widths and depths) is read from the
checkpoint's names and shapes, the decoder width and densify norm from
config.json (or the checkpoint's `config` entry), the mask from inputs.npz.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop import cnn_names
from mimdistill.interop.pth_reader import load_pth, read_pickle_tree
from mimdistill.models import sparse
from mimdistill.models.cnn_zoo import build_cnn
from mimdistill.models.spark import SparK
from mimdistill.objectives.spark_loss import spark_loss
from mimdistill.parity.report import GRAD_REL_TOL

# Maps after train-mode BatchNorm are compared relative to their largest
# magnitude: batch statistics over few positions (8 rows at stride 32 here)
# amplify float32 rounding, so that SparK's own code re-run in float32 on
# another CPU differs from the stored outputs by up to 6e-5 absolute (1e-5
# relative) on the decoder blocks, while our float64 forward equals SparK's
# float64 forward to 1e-12. Reconstruction, per-patch mse and loss keep the
# 1e-5 absolute tolerance.
TRAIN_BN_REL_TOL = 1e-4
# Gradients are compared relative to their own largest magnitude, but never
# to less than this fraction of the largest gradient of the model: some are
# analytically 0 or nearly so (a per-channel bias right before a
# train-mode BatchNorm, whose mean removes it), and SparK's own float32
# values for those are rounding noise (e.g. 7.8e-7 stored where float64
# gives 7.8e-7 +- 1.2e-10, i.e. 1.6e-4 relative, with a largest gradient of
# 5e-2; or 5e-12 where float64 gives 2e-20).
GRAD_NOISE_FLOOR = 1e-4


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def checkpoint_name(folder, config, suffix=".pth"):
  names = [n for n in config.get("checkpoints", {}) if n.endswith(suffix)]
  return sorted(names or [p.name for p in folder.glob(f"*{suffix}")])[0]


def spark_config_entry(path) -> dict:
  """SparK's `state_dict(with_config=True)` puts a plain dict under
  'config' next to the tensors; `load_pth` reports it as skipped."""
  tree = read_pickle_tree(path)
  module = tree.get("module", tree) if isinstance(tree, dict) else {}
  entry = module.get("config") if isinstance(module, dict) else None
  return dict(entry) if isinstance(entry, dict) else {}


def encoder_state_dict(tensors, prefix=cnn_names.SPARK_ENCODER_PREFIX):
  return {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}


def build_spark(tensors, config, entry):
  encoder_fields = cnn_names.cnn_fields(encoder_state_dict(tensors))
  encoder_fields["drop_path_rate"] = float(config.get("drop_path_rate", 0.0))
  width = config.get("decoder_width", entry.get("dense_decoder.width"))
  if width is None:
    width = int(np.shape(tensors["dense_decoder.dec.0.up_sample.weight"])[0])
  norm = config.get("densify_norm", entry.get("densify_norm_str", "bn"))
  return SparK(build_cnn(encoder_fields), decoder_width=int(width), densify_norm=norm)


def check(folder, config, report):
  case = folder.name
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  ckpt_path = folder / checkpoint_name(folder, config)
  ckpt = load_pth(ckpt_path)
  entry = spark_config_entry(ckpt_path)
  variables, conversion = cnn_names.to_flax(ckpt.tensors, "spark")
  model = build_spark(ckpt.tensors, config, entry)
  if model.encoder.drop_path_rate:
    raise SystemExit(f"parity: {case} uses drop path, whose random draws cannot be reproduced")

  images = nhwc(inputs["images"])
  active = jnp.asarray(inputs["active_b1ff"][:, 0])
  grid = active.shape[-1]
  if "mask_noise" in inputs:
    ratio = float(config.get("mask_ratio", entry.get("mask_ratio", 0.6)))
    got = np.asarray(sparse.active_from_noise(jnp.asarray(inputs["mask_noise"]), grid, ratio))
    report.check(case, "mask_from_noise", bool((got == np.asarray(active)).all()))
  if "len_keep" in config:
    report.check(
      case, "len_keep", sparse.num_kept(grid, float(config["mask_ratio"])) == config["len_keep"]
    )

  params, stats = variables["params"], variables.get("batch_stats", {})

  def loss_fn(params):
    out, new_state = model.apply(
      {"params": params, "batch_stats": stats}, images, active, train=True, mutable=["batch_stats"]
    )
    loss = spark_loss(out.rec, images, active)
    return loss.loss, (out, loss, new_state["batch_stats"])

  (_, (out, loss, new_stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  for k, feat in enumerate(out.features):
    report.compare_relative(
      case, f"encoder_features/{k}", nchw(feat), expected[f"encoder_features/{k}"], TRAIN_BN_REL_TOL
    )
  for part in ("normed", "filled", "to_dec"):
    for i, x in enumerate(getattr(out, part)):
      key = f"densify/{i}/{part}"
      if key in expected:
        report.compare_relative(case, key, nchw(x), expected[key], TRAIN_BN_REL_TOL)
  for i, x in enumerate(out.decoder_blocks):
    if f"decoder/block{i}" in expected:
      report.compare_relative(
        case, f"decoder/block{i}", nchw(x), expected[f"decoder/block{i}"], TRAIN_BN_REL_TOL
      )
  report.compare(case, "rec", nchw(out.rec), expected["rec"])
  report.compare(case, "patch_l2", loss.patch_l2, expected["patch_l2"])
  report.compare(case, "loss", loss.loss, expected["loss"])

  want_grads = {k[len("grad/") :] for k in expected.files if k.startswith("grad/")}
  got_grads = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    keys = ("params", *(str(getattr(k, "key", k)) for k in path))
    name, value = cnn_names.flax_to_torch(keys, np.asarray(g), "spark")
    got_grads[name] = value
  differ = sorted(want_grads ^ set(got_grads))
  report.check(case, "grad:names", not differ, f"differing names: {differ}" if differ else "")
  common = sorted(want_grads & set(got_grads))
  largest = max((float(np.max(np.abs(expected[f"grad/{n}"]))) for n in common), default=0.0)
  worst = (0.0, "")
  for n in common:
    want = expected[f"grad/{n}"]
    own = float(np.max(np.abs(want)))
    scale = max(own, GRAD_NOISE_FLOOR * largest, 1e-30)
    rel = (got_grads[n].astype(np.float64) - want) / scale
    if own < GRAD_NOISE_FLOOR * largest:
      print(f"# {case} grad/{n}: near zero ({own:.1e}), relative to the floor", file=report.stream)
    report.compare(case, f"grad/{n}", rel, np.zeros_like(rel), tol=GRAD_REL_TOL)
    worst = max(worst, (float(np.max(np.abs(rel))), n))
  print(f"# {case} worst gradient: {worst[1]} {worst[0]:.3e}", file=report.stream)

  after = cnn_names.to_torch({"batch_stats": new_stats}, "spark")
  want_bn = {k[len("bn_after_step/") :] for k in expected.files if k.startswith("bn_after_step/")}
  stats_names = {n for n in want_bn if not n.endswith("num_batches_tracked")}
  differ = sorted(stats_names ^ {n for n in after if not n.endswith("num_batches_tracked")})
  report.check(case, "bn_after_step:names", not differ, f"differing: {differ}" if differ else "")
  for n in sorted(stats_names & set(after)):
    report.compare(case, f"bn_after_step/{n}", after[n], expected[f"bn_after_step/{n}"])
  counters = [n for n in want_bn if n.endswith("num_batches_tracked")]
  if counters:
    # Our tree keeps no step counter: the export writes the one it is given.
    before = {n: int(ckpt.tensors[n]) for n in counters if n in ckpt.tensors}
    bumped = cnn_names.to_torch({"batch_stats": new_stats}, "spark", num_batches_tracked=1)
    ok = all(int(expected[f"bn_after_step/{n}"]) == before.get(n, 0) + 1 for n in counters)
    ok = ok and all(int(bumped[n]) == 1 for n in counters if before.get(n, 0) == 0)
    report.check(case, "bn_after_step:num_batches_tracked", ok)

  # Export: the imported tree written back under SparK's names is the file.
  exported = cnn_names.to_torch(variables, "spark")
  kept = {n for n in ckpt.tensors if n not in conversion.skipped}
  kept |= {n for n in ckpt.tensors if n.endswith("num_batches_tracked")}
  differ = sorted(kept ^ set(exported))
  report.check(case, "export:names", not differ, f"differing: {differ}" if differ else "")
  err = max(
    float(np.max(np.abs(exported[n].astype(np.float64) - ckpt.tensors[n]), initial=0.0))
    for n in sorted(kept & set(exported))
    if not n.endswith("num_batches_tracked")
  )
  report.compare(case, "export:values", err, 0.0, tol=0.0)
