"""CNN students: shapes and strides, sparse == dense under an all-visible
mask, masked-pixel invariance, SyncBN-by-construction on 8 devices, names
and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimdistill.interop import cnn_names
from mimdistill.models import sparse
from mimdistill.models.cnn_zoo import build_cnn
from mimdistill.models.convnext import ConvNeXt
from mimdistill.models.resnet import ResNet

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(KEY, (4, 64, 64, 3))
ACTIVE = jnp.array([[[1, 0], [0, 1]], [[1, 1], [0, 0]], [[0, 1], [1, 1]], [[1, 0], [1, 0]]], bool)
MODELS = {
  "basic": dict(family="resnet", block="basic", layers=(1, 1, 1, 1), div=16, num_classes=5),
  "bottleneck": dict(family="resnet", block="bottleneck", layers=(1, 2, 1, 1), div=16),
  "convnext": dict(family="convnext", depths=(1, 1, 2, 1), dims=(8, 16, 16, 32), num_classes=5),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request):
  model = build_cnn(MODELS[request.param])
  return request.param, model, numpy_variables(model, IMAGES[:1])


def numpy_variables(model, *args, seed=1):
  """Random variables of the model's shapes, drawn with numpy: XLA's CPU
  compile of one threefry draw per param shape costs seconds each on a
  loaded 2-core host, model.init would dominate the test. Scales, running
  variances and biases are perturbed so that every one of them matters."""
  shapes = jax.eval_shape(model.init, KEY, *args)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    leaf = str(getattr(path[-1], "key", path[-1]))
    if leaf in ("scale", "var", "gamma"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1])) or 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_stage_shapes_and_strides(built):
  name, model, variables = built
  out = jax.jit(model.apply)(variables, IMAGES)
  widths = model.feature_channels()
  assert [f.shape for f in out.features] == [
    (4, 64 // s, 64 // s, w) for s, w in zip((4, 8, 16, 32), widths)
  ]
  if model.num_classes:
    assert out.logits.shape == (4, 5)
  else:
    assert out.logits is None


def test_sparse_with_all_visible_mask_is_dense(built):
  """Train mode: the batch statistics too (eval mode has none to differ)."""
  _, model, variables = built
  ones = jnp.ones((4, 2, 2), bool)
  run = jax.jit(lambda v, x, a: model.apply(v, x, a, train=True, mutable=["batch_stats"]))
  dense, dense_stats = run(variables, IMAGES, None)
  sparse_out, sparse_stats = run(variables, IMAGES, ones)
  for a, b in zip(dense.features, sparse_out.features):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), dense_stats, sparse_stats
  )


def test_sparse_features_ignore_masked_pixels_and_are_zero_there(built):
  _, model, variables = built
  noise = jax.random.normal(jax.random.PRNGKey(2), IMAGES.shape)
  other = jnp.where(sparse.mask_at(ACTIVE, 64, 64, bool), IMAGES, noise)
  run = jax.jit(lambda v, x: model.apply(v, x, ACTIVE, train=True, mutable=["batch_stats"])[0])
  a, b = run(variables, IMAGES), run(variables, other)
  for fa, fb in zip(a.features, b.features):
    np.testing.assert_allclose(fa, fb, atol=1e-6)
    hidden = ~sparse.mask_at(ACTIVE, fa.shape[1], fa.shape[2], bool)[..., 0]
    assert (np.asarray(fa)[np.asarray(hidden)] == 0).all()


def test_masked_batchnorm_statistics_are_global_on_eight_devices():
  """SyncBN by construction: the same jitted step on a batch sharded over a
  ('data',) mesh of 8 devices gives the 1-device statistics and output."""
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  bn = sparse.BatchNorm()
  x = jax.random.normal(KEY, (8, 4, 4, 6)) * 3 + 1
  active = jax.random.bernoulli(jax.random.PRNGKey(3), 0.4, (8, 2, 2)).at[0].set(True)
  variables = bn.init(KEY, x[:1])
  step = jax.jit(lambda v, x, a: bn.apply(v, x, a, train=True, mutable=["batch_stats"]))
  one = step(variables, x, active)
  mesh = jax.sharding.Mesh(np.asarray(devices[:8]), ("data",))
  shard = lambda a: jax.device_put(
    a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  )
  eight = step(variables, shard(x), shard(active))
  assert len(eight[0].sharding.device_set) == 8
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one, eight)
  # And they are the statistics of the active rows only (BatchNorm1d on them).
  rows = np.asarray(x)[np.asarray(sparse.mask_at(active, 4, 4, bool)[..., 0])]
  n = len(rows)
  np.testing.assert_allclose(one[1]["batch_stats"]["mean"], 0.1 * rows.mean(0), atol=1e-6)
  np.testing.assert_allclose(
    one[1]["batch_stats"]["var"], 0.9 + 0.1 * rows.var(0) * n / (n - 1), atol=1e-5
  )


def test_mask_from_noise_keeps_the_smallest():
  noise = jnp.array([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.4, 0.6]])
  active = sparse.active_from_noise(noise, 2, 0.5)
  np.testing.assert_array_equal(
    active, [[[False, True], [False, True]], [[True, False], [True, False]]]
  )
  assert sparse.num_kept(7, 0.75) == round(49 * 0.25) == 12


def test_torch_names_round_trip(built):
  _, _, variables = built
  state = cnn_names.to_torch(variables)
  back, report = cnn_names.to_flax(state)
  variables = jax.device_get(variables)
  assert all(n.endswith("num_batches_tracked") for n in report.skipped)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, back)
  fields = cnn_names.cnn_fields(state)
  shapes = jax.eval_shape(build_cnn(fields).init, KEY, IMAGES[:1])
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(back)


def test_timm_convnext_names_round_trip():
  names = [
    "downsample_layers.0.0.weight",
    "downsample_layers.2.1.bias",
    "stages.2.10.dwconv.weight",
    "stages.1.0.pwconv2.bias",
    "stages.3.0.gamma",
    "norm.weight",
    "head.bias",
  ]
  timm = [cnn_names.convnext_to_timm(n) for n in names]
  assert timm[:3] == [
    "stem.0.weight",
    "stages.2.downsample.1.bias",
    "stages.2.blocks.10.conv_dw.weight",
  ]
  assert timm[-2:] == ["head.norm.weight", "head.fc.bias"]
  assert [cnn_names.convnext_from_timm(n) for n in timm] == names


def test_clear_errors():
  with pytest.raises(ValueError, match=r"unknown ResNet depth 42; known: \[18, 34, 50, 101, 152\]"):
    build_cnn({"family": "resnet", "depth": 42})
  with pytest.raises(ValueError, match="unknown ConvNeXt variant 'huge'; known: "):
    build_cnn({"family": "convnext", "variant": "huge"})
  with pytest.raises(ValueError, match="unknown CNN family 'vgg'"):
    build_cnn({"family": "vgg"})
  model = ResNet(depth=18, div=16)
  variables = jax.eval_shape(model.init, KEY, IMAGES[:1])
  with pytest.raises(ValueError, match="image size 48 is not a multiple of 32"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)), jnp.ones((1, 1, 1), bool))
  with pytest.raises(ValueError, match="image size 40 is not a multiple of 32"):
    jax.eval_shape(
      ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8)).init,
      KEY,
      jnp.zeros((1, 40, 40, 3)),
      jnp.ones((1, 1, 1), bool),
    )


def test_named_depths_build_timm_shapes():
  shapes = jax.eval_shape(
    lambda x: build_cnn({"name": "resnet50", "num_classes": 1000}).init(KEY, x),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )["params"]
  assert shapes["layer3_5"]["conv3"]["kernel"].shape == (1, 1, 256, 1024)
  assert shapes["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 256, 512)
  assert shapes["fc"]["kernel"].shape == (2048, 1000)
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  assert count == 25_557_032  # timm resnet50
  shapes = jax.eval_shape(
    lambda x: build_cnn({"name": "convnext_tiny", "num_classes": 1000}).init(KEY, x),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )["params"]
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  assert count == 28_589_128  # official convnext_tiny
