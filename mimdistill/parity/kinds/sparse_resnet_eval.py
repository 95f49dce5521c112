"""Kind `sparse_resnet_eval`: SparK's sparse encoder in eval mode (BN running
statistics at active positions, 0 elsewhere) for a stored mask, and the
plain dense network's stage outputs and logits (timm `ResNet.forward`:
conv1-bn1-relu-maxpool-layer1..4-global average pool-fc) after loading
SparK's encoder-only checkpoint (a raw timm state dict, no classifier; the
classifier comes from inputs.npz, as `load_state_dict(strict=False)` leaves
it to the caller). Also the export of the loaded weights to timm names.

The architecture (ResNet or ConvNeXt, any widths and depths) is read from
the checkpoint; nothing about the model is taken from the fixture's sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop import cnn_names
from mimdistill.interop.pth_reader import load_pth
from mimdistill.models.cnn_zoo import build_cnn
from mimdistill.parity.kinds.spark import checkpoint_name, nchw, nhwc

# Stage outputs are compared relative to their largest magnitude (~8 here):
# through 17 conv+BN layers float32 rounding alone reaches 1e-5 absolute
# (SparK's timm ResNet run in float64 differs from the stored float32
# outputs by 2e-5, i.e. 3e-6 relative). Logits keep the absolute 1e-5.
FEATURE_REL_TOL = 1e-5
CLASSIFIER_NAMES = ("fc.weight", "fc.bias", "head.weight", "head.bias", "norm.weight", "norm.bias")


def check(folder, config, report):
  case = folder.name
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  ckpt = load_pth(folder / checkpoint_name(folder, config))
  encoder_sd = dict(ckpt.tensors)
  if cnn_names.is_timm_convnext(encoder_sd):
    encoder_sd = {cnn_names.convnext_from_timm(n): v for n, v in encoder_sd.items()}
  # The classifier SparK's fine-tuning adds (missing from the file).
  classifier = {n: inputs[n] for n in CLASSIFIER_NAMES if n in inputs.files}
  fields = cnn_names.cnn_fields({**encoder_sd, **classifier})
  model = build_cnn(fields)
  variables, _ = cnn_names.to_flax({**encoder_sd, **classifier}, "cnn")

  images = nhwc(inputs["images"])
  active = jnp.asarray(inputs["active_b1ff"][:, 0])
  sparse_out = jax.jit(lambda v, x, a: model.apply(v, x, a, train=False))(variables, images, active)
  for k, feat in enumerate(sparse_out.features):
    if f"features/{k}" in expected:
      report.compare_relative(
        case, f"features/{k}", nchw(feat), expected[f"features/{k}"], FEATURE_REL_TOL
      )
      # Inactive positions are exactly 0, as SparK scatters into zeros.
      inactive = ~np.repeat(
        np.repeat(np.asarray(active), feat.shape[1] // active.shape[1], 1),
        feat.shape[2] // active.shape[2],
        2,
      )
      report.check(case, f"features/{k}:zero_where_masked", bool(
        (np.asarray(feat)[inactive] == 0).all()
      ))  # fmt: skip

  dense_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  for k, feat in enumerate(dense_out.features):
    if f"dense_features/{k}" in expected:
      report.compare_relative(
        case, f"dense_features/{k}", nchw(feat), expected[f"dense_features/{k}"], FEATURE_REL_TOL
      )
  if "logits" in expected:
    report.compare(case, "logits", dense_out.logits, expected["logits"])

  # Export: timm names with every BN counter, the file's tensors unchanged.
  exported = cnn_names.to_torch(variables, "cnn")
  differ = sorted(set(encoder_sd) ^ (set(exported) - set(classifier)))
  report.check(case, "export:names", not differ, f"differing: {differ}" if differ else "")
  err = max(
    float(np.max(np.abs(exported[n].astype(np.float64) - encoder_sd[n]), initial=0.0))
    for n in sorted(set(encoder_sd) & set(exported))
    if not n.endswith("num_batches_tracked")
  )
  report.compare(case, "export:values", err, 0.0, tol=0.0)
