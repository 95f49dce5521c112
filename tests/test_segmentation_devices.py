"""The segmentor's training step on 8 fake devices (batch sharded, BatchNorm
statistics over the global batch under jit) gives the same params and
BatchNorm statistics as on 1 device after 3 steps (a reduced UperNet: two pyramid
levels, no auxiliary head, so that it compiles in reasonable time)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_segmentation_model import tiny_config

from mimdistill.models import factory
from mimdistill.objectives.segmentation_loss import segmentation_loss
from mimdistill.training.poly_schedule import poly_warmup
from mimdistill.training.segmentation_optim import segmentation_adamw

LR = 1e-3
# Biases a following train-mode BatchNorm cancels: their exact gradient is
# 0, so Adam turns round-off of either reduction order into steps of up to
# lr; they are compared to that bound instead.
ZERO_GRADIENT = ("backbone/fpn1_0/bias", "backbone/fpn1_3/bias", "backbone/fpn2_0/bias")


def _random_variables(model, x, seed=0):
  """Params drawn in numpy (initialising with jax compiles slowly on CPU):
  BatchNorm scales and running variances 1, counters 0, the rest N(0, 0.1)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  rng = np.random.default_rng(seed)

  def make(path, s):
    leaf = str(getattr(path[-1], "key", path[-1]))
    if leaf == "num_batches_tracked":
      return np.zeros(s.shape, np.int32)
    if leaf in ("running_var",) or (leaf == "scale" and len(path) > 1):
      return np.ones(s.shape, np.float32)
    if leaf == "running_mean":
      return np.zeros(s.shape, np.float32)
    return (rng.normal(size=s.shape) * 0.1).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, dict(shapes))


def test_eight_devices_equal_one_device_after_three_steps():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  config = tiny_config(width=16, num_heads=1)
  # Fewer pyramid levels and no auxiliary head: a smaller program to
  # compile twice, the same BatchNorm and sharding behaviour.
  config["decode_head"].update(channels=8, pool_scales=(1, 2))
  config["auxiliary_head"] = None
  model = factory.build("segmentor", config)
  variables = _random_variables(model, jnp.zeros((8, 32, 32, 3)))
  tx = segmentation_adamw(
    variables["params"],
    LR,
    lambda lr: poly_warmup(lr, 10, warmup_iters=2, warmup_ratio=0.1),
    num_layers=4,
    layer_decay_rate=0.75,
  )
  rng = np.random.default_rng(6)
  images = rng.normal(size=(3, 8, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 5, size=(3, 8, 32, 32)).astype(np.int32)
  labels[:, :, :4] = 255

  @jax.jit
  def step(state, image, label):
    params, stats, opt = state

    def loss_fn(p):
      out, new = model.apply(
        {"params": p, "batch_stats": stats}, image, train=True, mutable=["batch_stats"]
      )
      return segmentation_loss(out, label)[0], new["batch_stats"]

    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new_stats, opt

  def run(put):
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    for i in range(3):
      state = step(state, put(images[i]), put(labels[i]))
    return jax.device_get({"params": state[0], "batch_stats": state[1]})

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  one = run(jnp.asarray)
  eight = run(lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))))
  flat_one = jax.tree_util.tree_flatten_with_path(one)[0]
  flat_eight = dict(jax.tree_util.tree_flatten_with_path(eight)[0])
  for path, a in flat_one:
    name = "/".join(str(getattr(k, "key", k)) for k in path[1:])
    b = flat_eight[path]
    if name in ZERO_GRADIENT:
      np.testing.assert_allclose(a, b, atol=3 * 2 * LR, err_msg=name)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  assert int(one["batch_stats"]["decode_head"]["bottleneck"]["bn"]["num_batches_tracked"]) == 3
