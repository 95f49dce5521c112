"""mmseg's decode-head losses for TinyMIM's UperNet, in float32.

Per head (`BaseDecodeHead.losses` with `CrossEntropyLoss(use_sigmoid=
False)`): the NHWC logits are resized to the label size (bilinear,
align_corners=False), pixel cross-entropy is taken where the label is not
`ignore_index` (255), and the sum is divided by ALL label pixels, B*H*W:
ignored pixels count in the denominator (mmseg 1.x `avg_non_ignore=False`;
mmseg 0.11 has no such option and computes the same). Head losses are
weighted (decode 1.0, auxiliary 0.4) and summed (`parse_losses`).

`acc_seg` (percent, argmax = label): mmseg 1.x's `accuracy(...,
ignore_index)` = (correct + eps) / (valid + eps) over non-ignored pixels;
mmseg 0.11's (logged only) divides by all pixels, counting ignored ones as
wrong: `acc_seg_mmseg011`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models.resize import resize_bilinear

IGNORE_INDEX = 255
HEAD_WEIGHTS = {"decode": 1.0, "aux": 0.4}
_EPS = float(np.finfo(np.float32).eps)


def _resized(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return resize_bilinear(
    logits.astype(jnp.result_type(logits.dtype, jnp.float32)), labels.shape[1:3]
  )


def pixel_cross_entropy(
  logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
  """Mean over all `(B, H, W)` label pixels of the cross-entropy of the
  NHWC `logits` (any resolution) resized to the labels; 0 where ignored."""
  logp = jax.nn.log_softmax(_resized(logits, labels), axis=-1)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size


def accuracy(
  logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> dict[str, jax.Array]:
  """`acc_seg` (mmseg 1.x) and `acc_seg_mmseg011`, in percent."""
  pred = jnp.argmax(_resized(logits, labels), axis=-1)
  valid = labels != ignore_index
  correct = jnp.sum((pred == labels) & valid).astype(jnp.float32)
  return {
    "acc_seg": (correct + _EPS) * (100.0 / (jnp.sum(valid).astype(jnp.float32) + _EPS)),
    "acc_seg_mmseg011": correct * (100.0 / labels.size),
  }


def segmentation_loss(
  outputs: Mapping[str, jax.Array],
  labels: jax.Array,
  *,
  weights: Mapping[str, float] = HEAD_WEIGHTS,
  ignore_index: int = IGNORE_INDEX,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(loss, metrics)` for the segmentor's `{'decode': ..., 'aux': ...}`
  logits and `(B, H, W)` integer labels. Metrics: `loss_<head>` (weighted),
  `acc_seg_<head>`, `acc_seg_mmseg011_<head>`, `loss` (their sum)."""
  metrics: dict[str, jax.Array] = {}
  total = 0.0
  for head, logits in outputs.items():
    if head not in weights:
      continue
    loss = weights[head] * pixel_cross_entropy(logits, labels, ignore_index)
    total = total + loss
    metrics[f"loss_{head}"] = loss
    for key, value in accuracy(logits, labels, ignore_index).items():
      metrics[f"{key}_{head}"] = jax.lax.stop_gradient(value)
  metrics["loss"] = total
  return total, metrics
