"""Kind `seg_slide`: mmseg's sliding-window inference with the segmentation
case's model in eval mode: the windows, per-crop decode logits, overlap
counts, averaged logits at the input size, logits resized to the original
shape and their argmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models.resize import resize_bilinear
from mimdistill.parity.kinds.segmentation import load_segmentor, nchw, nhwc
from mimdistill.training import segmentation_inference as inference


def check(folder, config, report):
  case = folder.name
  model, variables, _ = load_segmentor(folder, config)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  images = nhwc(inputs["images"])
  test_cfg = config["segmentor"].get("test_cfg", {})
  crop = tuple(config.get("crop_size") or test_cfg["crop_size"])
  stride = tuple(config.get("stride") or test_cfg["stride"])
  ori_shape = tuple(config["ori_shape"])
  h, w = images.shape[1:3]

  windows = inference.slide_windows(h, w, crop, stride)
  report.compare(case, "windows", np.asarray(windows), expected["windows"], tol=0)
  report.compare(
    case, "count_mat", inference.count_matrix(h, w, windows), expected["count_mat"], tol=0
  )

  def decode(x):
    return model.apply(variables, x, train=False)["decode"]

  def run(x):
    logits_fn = lambda c: resize_bilinear(decode(c), c.shape[1:3])
    logits, _ = inference.slide_inference(logits_fn, x, crop, stride, return_crops=True)
    ori = inference.resize_to(logits, ori_shape)
    crops = jnp.concatenate([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    return logits, ori, inference.predict(ori), decode(crops)

  logits, ori, pred, crop_decode = jax.jit(run)(images)
  b = images.shape[0]
  for j in range(len(windows)):
    key = f"crop_decode_logits/{j}"
    if key in expected.files:
      report.compare(case, key, nchw(crop_decode[j * b : (j + 1) * b]), expected[key])
  report.compare(case, "slide_logits", nchw(logits), expected["slide_logits"])
  report.compare(case, "seg_logits_ori", nchw(ori), expected["seg_logits_ori"])
  report.compare(case, "pred_ori", pred, expected["pred_ori"], tol=0)
