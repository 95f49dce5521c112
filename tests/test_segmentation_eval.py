"""Segmentation evaluation and optimisation pieces: slide windows, metrics
edge cases on padded / sharded batches, the layer-decay table and groups,
the poly schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mimdistill.training import segmentation_inference as inference
from mimdistill.training import segmentation_metrics as sm
from mimdistill.training.poly_schedule import poly_warmup
from mimdistill.training.segmentation_optim import param_groups, segmentation_adamw


@pytest.mark.parametrize(
  "hw,crop,stride",
  [((80, 80), (64, 64), (43, 43)), ((64, 150), (64, 64), (30, 41)), ((32, 32), (32, 32), (5, 5))],
)
def test_slide_windows_cover_every_pixel_inside_the_image(hw, crop, stride):
  windows = inference.slide_windows(*hw, crop, stride)
  for y1, y2, x1, x2 in windows:
    assert (y2 - y1, x2 - x1) == crop
    assert 0 <= y1 and y2 <= hw[0] and 0 <= x1 and x2 <= hw[1]
  count = inference.count_matrix(*hw, windows)
  assert count.min() >= 1


def test_slide_inference_averages_overlaps():
  # A "model" that returns its crop: averaging the overlapping windows must
  # give the image back, whatever the overlap counts.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 50, 3)).astype(np.float32))
  logits = inference.slide_inference(lambda c: c * 1.0, x, (32, 32), (11, 13))
  np.testing.assert_allclose(logits, x, atol=1e-6)
  ori = inference.resize_to(logits, (20, 25))
  assert ori.shape == (2, 20, 25, 3)
  assert inference.predict(ori).shape == (2, 20, 25)


def test_slide_refuses_an_image_smaller_than_the_crop():
  with pytest.raises(ValueError, match="smaller than the slide crop"):
    inference.slide_windows(30, 80, (32, 32), (21, 21))


def test_metrics_edge_cases():
  # class 0: normal; 1: predicted only (IoU 0, Acc NaN); 2: absent (NaN, NaN);
  # 3: labelled only (IoU 0, Acc 0); ignore pixels predicted as 1 do not count.
  label = np.array([[0, 0, 3, 255, 255]])
  pred = np.array([[0, 1, 0, 1, 1]])
  areas = np.asarray(sm.batch_areas(jnp.asarray(pred[None]), jnp.asarray(label[None]), 4))
  inter, union, area_pred, area_label = areas
  np.testing.assert_array_equal(inter, [1, 0, 0, 0])
  np.testing.assert_array_equal(area_pred, [2, 1, 0, 0])
  np.testing.assert_array_equal(area_label, [2, 0, 0, 1])
  np.testing.assert_array_equal(union, [3, 1, 0, 1])
  m = sm.metrics_from_areas(areas)
  np.testing.assert_allclose(m["IoU"], [1 / 3, 0, np.nan, 0])
  np.testing.assert_allclose(m["Acc"], [0.5, np.nan, np.nan, 0])
  np.testing.assert_allclose(m["aAcc"], 1 / 3)
  np.testing.assert_allclose(m["mIoU"], (1 / 3) / 3)
  np.testing.assert_allclose(m["mAcc"], 0.25)


def test_metrics_count_every_pixel_once_on_8_devices_with_padding():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  rng = np.random.default_rng(1)
  n_real, batch, k = 11, 16, 5  # 11 examples in 2 padded batches of 16
  preds = rng.integers(0, k, size=(n_real, 6, 7))
  labels = rng.integers(0, k, size=(n_real, 6, 7))
  labels[:, 0] = 255
  expected = sum(
    np.asarray(sm.batch_areas(jnp.asarray(p[None]), jnp.asarray(lab[None]), k))
    for p, lab in zip(preds, labels, strict=True)
  )
  pad = batch * 2 - n_real
  pred_b = np.concatenate([preds, np.zeros((pad, 6, 7), int)]).reshape(2, batch, 6, 7)
  label_b = np.concatenate([labels, np.zeros((pad, 6, 7), int)]).reshape(2, batch, 6, 7)
  mask_b = np.concatenate([np.ones(n_real), np.zeros(pad)]).reshape(2, batch)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("data")))
  fn = jax.jit(lambda p, lab, m: sm.batch_areas(p, lab, k, mask=m))
  total = None
  for i in range(2):
    total = sm.accumulate(total, fn(put(pred_b[i]), put(label_b[i]), put(mask_b[i])))
  np.testing.assert_array_equal(np.asarray(total), expected)


def test_reported_values_are_rounded_percentages():
  areas = np.array([[1, 2], [3, 4], [2, 3], [2, 3]])
  r = sm.reported(areas, "mmseg1x")
  assert r["mIoU"] == pytest.approx(round(100 * (1 / 3 + 2 / 4) / 2, 2), abs=1e-4)
  r = sm.reported(areas, "mmseg011")
  assert r["aAcc"] == pytest.approx(round(100 * 3 / 5, 2) / 100)


def test_reduce_zero_label():
  raw = np.array([[0, 1, 2, 150, 255]], np.uint8)
  np.testing.assert_array_equal(sm.reduce_zero_label(raw), [[255, 0, 1, 149, 255]])


def _params():
  d = lambda *s: np.zeros(s, np.float32)
  block = {
    "gamma_1": d(4),
    "norm1": {"scale": d(4), "bias": d(4)},
    "attn": {"qkv": {"kernel": d(4, 12), "bias": d(12)}, "relative_position_bias_table": d(12, 1)},
  }
  return {
    "backbone": {
      "encoder": {
        "cls_token": d(1, 1, 4),
        "dist_token": d(1, 1, 4),
        "pos_embed": d(1, 5, 4),
        "patch_embed": {"kernel": d(2, 2, 3, 4), "bias": d(4)},
        "blocks_0": block,
        "blocks_1": block,
      },
      "fpn1_0": {"kernel": d(2, 2, 4, 4), "bias": d(4)},
    },
    "decode_head": {"conv_seg": {"kernel": d(1, 1, 4, 3), "bias": d(3)}},
  }


def _table(no_decay):
  groups = param_groups(_params(), num_layers=2, layer_decay_rate=0.5, no_decay=no_decay)
  from mimdistill.interop.segmentation_names import official_name

  flat = jax.tree_util.tree_flatten_with_path(groups, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {official_name([str(k.key) for k in p]): g for p, g in flat}


def test_layer_decay_rule_and_official_weight_decay():
  t = _table("official")
  assert t["backbone.cls_token"] == (0, 0.5**3, 0.05)  # decayed: the official test never matches
  assert t["backbone.pos_embed"] == (0, 0.5**3, 0.05)
  assert t["backbone.patch_embed.proj.weight"][:2] == (0, 0.5**3)
  assert t["backbone.blocks.1.attn.qkv.weight"] == (2, 0.5, 0.05)
  assert t["backbone.blocks.1.attn.relative_position_bias_table"] == (2, 0.5, 0.05)
  assert t["backbone.blocks.0.gamma_1"] == (1, 0.25, 0.0)
  assert t["backbone.dist_token"] == (3, 1.0, 0.05)  # the top layer, as the official rule
  assert t["backbone.fpn1.0.weight"] == (3, 1.0, 0.05)
  assert t["decode_head.conv_seg.bias"] == (3, 1.0, 0.0)


def test_intended_no_decay_option():
  t = _table("intended")
  for name in (
    "backbone.cls_token",
    "backbone.pos_embed",
    "backbone.dist_token",
    "backbone.blocks.0.attn.relative_position_bias_table",
  ):
    assert t[name][2] == 0.0, name
  assert t["backbone.blocks.0.attn.qkv.weight"][2] == 0.05
  with pytest.raises(ValueError, match="no_decay"):
    param_groups(_params(), num_layers=2, layer_decay_rate=0.5, no_decay="none")


def test_groups_step_with_their_own_lr():
  params = jax.tree_util.tree_map(lambda x: x + 1.0, _params())
  tx = segmentation_adamw(
    params,
    1e-2,
    lambda lr: lambda step: lr,
    num_layers=2,
    layer_decay_rate=0.5,
    weight_decay=0.0,
  )
  grads = jax.tree_util.tree_map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -lr * sign(g): the group's lr.
  np.testing.assert_allclose(updates["backbone"]["encoder"]["cls_token"], -1e-2 * 0.125, rtol=1e-4)
  np.testing.assert_allclose(
    updates["backbone"]["encoder"]["blocks_1"]["gamma_1"], -1e-2 * 0.5, rtol=1e-4
  )
  np.testing.assert_allclose(updates["decode_head"]["conv_seg"]["bias"], -1e-2, rtol=1e-4)


def test_poly_schedule_formula():
  s = poly_warmup(1e-4, 100, power=1.0, min_lr=1e-6, warmup_iters=10, warmup_ratio=1e-6)
  regular = lambda it: (1e-4 - 1e-6) * (1 - it / 100) + 1e-6
  np.testing.assert_allclose(float(s(0)), regular(0) * 1e-6, rtol=1e-5)
  np.testing.assert_allclose(float(s(5)), regular(5) * (1 - 0.5 * (1 - 1e-6)), rtol=1e-5)
  np.testing.assert_allclose(float(s(10)), regular(10), rtol=1e-5)
  np.testing.assert_allclose(float(s(200)), 1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="warmup"):
    poly_warmup(1e-4, 100, warmup="cosine")
