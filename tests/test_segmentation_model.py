"""Segmentation model pieces: resize and pooling against independent
references, backbone shapes and errors, the loss with ignored pixels,
BatchNorm's closed-form gradient, and 8 devices == 1 device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimdistill.models import factory, resize
from mimdistill.models.torch_batch_norm import BatchNorm
from mimdistill.objectives.segmentation_loss import pixel_cross_entropy, segmentation_loss

TINY = dict(
  width=32,
  depth=4,
  num_heads=2,
  patch_size=16,
  image_size=32,
  out_indices=(0, 1, 2, 3),
  layer_scale=1.0,
  rel_pos_bias=True,
)


def tiny_config(**backbone):
  """A segmentor model section (`factory.build('segmentor', ...)`)."""
  return dict(
    TINY,
    **backbone,
    decode_head={"num_classes": 5, "channels": 16, "dropout_ratio": 0.0},
    auxiliary_head={"num_classes": 5, "channels": 8, "dropout_ratio": 0.0},
  )


def backbone(**fields):
  return factory.build("segmentor", tiny_config(**fields)).backbone


def _torch_bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Per output pixel, the four taps of torch's upsample_bilinear2d
  (align_corners=False), in float64, written independently of
  models.resize."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    sy = max((i + 0.5) * h / out_h - 0.5, 0.0)
    y0 = min(int(math.floor(sy)), h - 1)
    y1 = y0 + 1 if y0 < h - 1 else y0
    ly = sy - y0
    for j in range(out_w):
      sx = max((j + 0.5) * w / out_w - 0.5, 0.0)
      x0 = min(int(math.floor(sx)), w - 1)
      x1 = x0 + 1 if x0 < w - 1 else x0
      lx = sx - x0
      out[:, i, j] = (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) + ly * (
        (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
      )
  return out


@pytest.mark.parametrize("size", [(7, 9), (16, 5), (3, 3), (2, 13)])
def test_resize_matches_torch_formula_up_and_down(size):
  x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
  got = np.asarray(resize.resize_bilinear(jnp.asarray(x), size))
  np.testing.assert_allclose(got, _torch_bilinear_reference(x, *size), atol=2e-6)


def test_resize_shrinks_without_antialias():
  # Halving with align_corners=False averages exactly the 2x2 block: no
  # wider (antialiasing) filter as jax.image.resize would use.
  x = np.random.default_rng(1).normal(size=(1, 8, 8, 1)).astype(np.float32)
  got = np.asarray(resize.resize_bilinear(jnp.asarray(x), (4, 4)))
  blocks = x.reshape(1, 4, 2, 4, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(got, blocks, atol=1e-6)
  assert resize.resize_bilinear(jnp.asarray(x), (8, 8)) is not None


@pytest.mark.parametrize(
  "n,s,bins",
  [(4, 3, [(0, 2), (1, 3), (2, 4)]), (2, 3, [(0, 1), (0, 2), (1, 2)]), (6, 2, [(0, 3), (3, 6)])],
)
def test_adaptive_pool_bins_as_torch(n, s, bins):
  m = resize.adaptive_pool_matrix(n, s)
  for row, (a, b) in zip(m, bins, strict=True):
    expected = np.zeros(n)
    expected[a:b] = 1.0 / (b - a)
    np.testing.assert_allclose(row, expected, rtol=1e-6)
  x = np.random.default_rng(2).normal(size=(1, n, n, 2)).astype(np.float32)
  got = np.asarray(resize.adaptive_avg_pool(jnp.asarray(x), s))
  for i, (a, b) in enumerate(bins):
    for j, (c, d) in enumerate(bins):
      np.testing.assert_allclose(got[0, i, j], x[0, a:b, c:d].mean(axis=(0, 1)), atol=1e-6)


@pytest.mark.parametrize(
  "patch,neck,expected",
  [
    (16, "tinymim", [(8, 32), (4, 32), (2, 32), (1, 32)]),
    (8, "tinymim", [(8, 32), (4, 32), (2, 32), (1, 32)]),
    (4, "tinymim", [(8, 32), (4, 32), (2, 32), (1, 32)]),
  ],
)
def test_backbone_strides_and_channels(patch, neck, expected):
  model = backbone(patch_size=patch, neck=neck, depth=4, out_indices=(0, 1, 2, 3))
  x = jnp.zeros((2, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x)[0])
  assert [(s.shape[1], s.shape[-1]) for s in shapes] == expected
  assert [s.shape[-1] for s in shapes] == model.out_channels()


def test_star_backbone_shapes():
  model = backbone(
    width=16, depth=12, num_heads=2, out_indices=(3, 5, 7, 11), neck="tinymim_star", fc_dim=24
  )
  x = jnp.zeros((2, 32, 32, 3))
  out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x))
  assert [o.shape for o in out] == [(2, 8, 8, 64), (2, 4, 4, 64), (2, 2, 2, 64), (2, 1, 1, 64)]
  enc = variables["params"]["encoder"]
  assert enc["dist_token"].shape == (1, 1, 16)
  assert enc["pos_embed"].shape == (1, 6, 16)
  assert enc["blocks_0"]["attn"]["relative_position_bias_table"].shape == (9 + 6, 2)


@pytest.mark.parametrize(
  "fields,message",
  [
    (dict(image_size=40), "not divisible by patch_size=16"),
    (dict(out_indices=(0, 1, 2, 4)), "out_indices"),
    (dict(out_indices=(0, 1, 2, 3), depth=2), "beyond the backbone.s depth 2"),
    (dict(patch_size=14, image_size=28), "patch sizes"),
    (dict(neck="tinymim_star"), "depth 12"),
  ],
)
def test_backbone_errors(fields, message):
  with pytest.raises(ValueError, match=message):
    backbone(**fields)


def test_loss_counts_ignored_pixels_in_the_denominator():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 4, 4)).astype(np.int32)
  labels[0, :2] = 255
  labels[1] = 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != 255
  nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  expected = (nll * valid).sum() / labels.size
  got = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  loss, metrics = segmentation_loss(
    {"decode": jnp.asarray(logits), "aux": jnp.asarray(logits)}, jnp.asarray(labels)
  )
  np.testing.assert_allclose(loss, 1.4 * expected, rtol=1e-6)
  correct = ((logits.argmax(-1) == labels) & valid).sum()
  np.testing.assert_allclose(metrics["acc_seg_decode"], 100 * correct / valid.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["acc_seg_mmseg011_aux"], 100 * correct / labels.size)


@pytest.mark.parametrize("n", [2, 6])
def test_batch_norm_gradient_matches_float64(n):
  """The closed form for 2 values per channel (and the textbook one
  otherwise) against float64 autodiff of the plain formula."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(n, 1, 1, 3)).astype(np.float32) * 0.3
  dy = rng.normal(size=x.shape).astype(np.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), True)

  def f(params, xx):
    v = {"params": params, "batch_stats": variables["batch_stats"]}
    y, _ = bn.apply(v, xx, True, mutable=["batch_stats"])
    return jnp.sum(y * dy)

  got = jax.grad(f, argnums=(0, 1))(variables["params"], jnp.asarray(x))
  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)

    def ref(w, b, xx):
      m = xx.mean(axis=(0, 1, 2))
      v = ((xx - m) ** 2).mean(axis=(0, 1, 2))
      return jnp.sum(((xx - m) / jnp.sqrt(v + 1e-5) * w + b) * dy)

    w = jnp.ones(3, jnp.float64)
    want = jax.grad(ref, argnums=(0, 1, 2))(w, jnp.zeros(3, jnp.float64), x64)
  scale = np.abs(np.asarray(want[2])).max()
  np.testing.assert_allclose(got[1], want[2], atol=1e-5 * scale)
  np.testing.assert_allclose(got[0]["scale"], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[0]["bias"], want[1], rtol=1e-5, atol=1e-6)


def test_batch_norm_running_stats_as_torch():
  x = np.random.default_rng(5).normal(size=(4, 2, 2, 3)).astype(np.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), True)
  _, state = bn.apply(variables, jnp.asarray(x), True, mutable=["batch_stats"])
  stats = state["batch_stats"]
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(stats["running_mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["running_var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  assert int(stats["num_batches_tracked"]) == 1
