"""Kind `seg_metrics`: mmseg's mIoU evaluation (per-class areas summed over
images of different sizes, IoU / Acc with NaN for absent classes, aAcc,
nanmean mIoU / mAcc, the rounded values of mmseg 1.x and 0.11) and ADE20K's
`reduce_zero_label`. The images go through one padded, masked batch, as the
evaluation loop feeds them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mimdistill.training import segmentation_metrics as sm


def _padded_batch(preds, labels, ignore_index):
  h = max(p.shape[0] for p in preds)
  w = max(p.shape[1] for p in preds)
  n = len(preds) + 1  # one padding example, masked out
  pred = np.zeros((n, h, w), np.int32)
  label = np.full((n, h, w), ignore_index, np.int32)
  for i, (p, lab) in enumerate(zip(preds, labels, strict=True)):
    pred[i, : p.shape[0], : p.shape[1]] = p
    label[i, : lab.shape[0], : lab.shape[1]] = lab
  label[-1] = 0  # would count if the mask were ignored
  mask = np.ones(n, np.float32)
  mask[-1] = 0
  return jnp.asarray(pred), jnp.asarray(label), jnp.asarray(mask)


def check(folder, config, report):
  case = folder.name
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  k = int(config["num_classes"])
  ignore = int(config.get("ignore_index", 255))
  n = int(config["num_images"])
  preds = [inputs[f"pred/{i}"] for i in range(n)]
  labels = [inputs[f"label/{i}"] for i in range(n)]
  pred, label, mask = _padded_batch(preds, labels, ignore)
  areas = np.asarray(sm.batch_areas(pred, label, k, mask=mask, ignore_index=ignore))
  for i, name in enumerate(sm.AREAS):
    key = {"pred": "area_pred_label"}.get(name, f"area_{name}")
    report.compare(case, key, areas[i], expected[key], tol=0)

  metrics = sm.metrics_from_areas(areas)
  for key in ("aAcc", "IoU", "Acc", "mIoU", "mAcc"):
    got, want = np.asarray(metrics[key]), np.asarray(expected[key])
    same_nan = np.array_equal(np.isnan(got), np.isnan(want))
    report.check(case, f"{key}:nan_pattern", same_nan)
    report.compare(case, key, np.nan_to_num(got), np.nan_to_num(want), tol=1e-12)
  for style in ("mmseg1x", "mmseg011"):
    values = sm.reported(areas, style)
    for key in ("aAcc", "mIoU", "mAcc"):
      if f"{style}/{key}" in expected.files:
        report.compare(case, f"{style}/{key}", values[key], expected[f"{style}/{key}"], tol=1e-6)

  reduced = sm.reduce_zero_label(inputs["ade/raw_label"])
  report.compare(case, "ade/reduced_label", reduced, expected["ade/reduced_label"], tol=0)
  ade = np.asarray(
    sm.batch_areas(
      jnp.asarray(inputs["ade/pred"][None]), jnp.asarray(reduced[None].astype(np.int32)), k
    )
  )
  for i, name in enumerate(sm.AREAS):
    key = {"pred": "ade/area_pred_label"}.get(name, f"ade/area_{name}")
    report.compare(case, key, ade[i], expected[key], tol=0)
