"""Scale: the distillation update gives the same params on every mesh shape.

Three distillation steps of a tiny teacher -> student on 8 fake CPU devices
for the meshes (8 data), (4 data x 2 fsdp), (2 x 4), (1 x 8) are compared
with one device. The stage's own builders and the shared loop's set-up (`loop.prepare`:
the jitted, donated update and the placements) are used directly with
synthetic batches (no data, no checkpoints), so the test is about sharding only. With fsdp > 1 the student
params, the optimizer state and the teacher's params are split over the
`fsdp` axis.
"""

import functools
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from jax.sharding import PartitionSpec as P

from mimdistill.stages import distill
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib

sys.path.insert(0, str(REPO))
from configs import tinymim_distill  # noqa: E402

LR = 1e-4
STEPS = 3
BATCH = 16


def tiny_config():
  c = tinymim_distill.get_config("quickstart")
  c.teacher.update(width=64, depth=2, num_heads=4, patch_size=8, image_size=32, source="")
  c.student.update(width=32, depth=2, num_heads=2, patch_size=8, image_size=32)
  c.data.image_size = 32
  c.batch_size = BATCH
  c.total_steps = 10
  c.warmup_epochs = 0.0
  c.lr = LR
  return c


@pytest.fixture(scope="module")
def setup():
  """(task, synthetic batches, the initial state as host numpy)."""
  config = tiny_config()
  teacher, teacher_vars = distill.random_teacher(config)
  student = distill.build_student(config)
  task = distill.build_task(config, student, teacher, teacher_vars, steps_per_epoch=100)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    image = rng.standard_normal((BATCH, 32, 32, 3), dtype=np.float32)
    batches.append(
      {
        "image": image,
        "image_student": image * np.float32(0.9) + np.float32(0.05),
        "label": np.zeros((BATCH,), np.int32),
      }
    )
  # Initialised once; every mesh starts from these values (the loop's jitted
  # init gives the same on any mesh: keys do not depend on the sharding).
  init = jax.device_get(jax.jit(loop_lib.make_init_state(task))(jax.random.PRNGKey(0)))
  return task, batches, init


def run_steps(task, batches, init, mesh):
  prep = loop_lib.prepare(task, mesh, jax.random.PRNGKey(0))
  state = jax.device_put(init, prep.state_sharding)
  losses = []
  for batch in batches:
    state, metrics = prep.update(state, prep.place_batch(batch), prep.inputs)
    losses.append(float(metrics["loss"]))
  return state, prep.inputs, losses


@pytest.fixture(scope="module")
def one_device(setup):
  task, batches, init = setup
  state, _, losses = run_steps(task, batches, init, shard_lib.make_mesh(1, num_devices=1))
  return jax.device_get(state.params), losses


def _fsdp_split(tree) -> int:
  """How many leaves are split over the fsdp axis."""
  return sum(shard_lib.FSDP in tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(tree))


def assert_params_match(one, other, atol=1e-5):
  """Every param to `atol`, except the key part of the qkv biases, whose
  gradient is analytically zero (softmax ignores a per-row constant): there
  Adam scales rounding noise up to about lr per step, so it is only held to
  that bound."""
  flat_b = dict(jax.tree_util.tree_flatten_with_path(other)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(one)[0]:
    b, name = flat_b[path], jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    if name.endswith("['qkv']['bias']"):
      k = np.s_[a.shape[-1] // 3 : 2 * a.shape[-1] // 3]
      np.testing.assert_allclose(np.delete(a, k), np.delete(b, k), atol=atol, rtol=0, err_msg=name)
      assert np.abs(a[k] - b[k]).max() <= 2 * STEPS * LR, name
    else:
      np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize(
  "data,fsdp",
  [(8, 1), (4, 2), (2, 4), (1, 8)],
  ids=["data8", "data4_fsdp2", "data2_fsdp4", "fsdp8"],
)
def test_mesh_shape_matches_one_device(setup, one_device, data, fsdp):
  assert jax.device_count() == 8
  task, batches, init = setup
  mesh = shard_lib.make_mesh(fsdp)
  assert dict(mesh.shape) == {shard_lib.DATA: data, shard_lib.FSDP: fsdp}
  state, inputs, losses = run_steps(task, batches, init, mesh)
  if fsdp > 1:
    # Student params, their Adam moments and the teacher are really split.
    assert _fsdp_split(state.params) > 0
    assert _fsdp_split(state.opt_state) > 0
    assert _fsdp_split(inputs) > 0
    kernel = inputs["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P(None, shard_lib.FSDP)
    assert kernel.addressable_shards[0].data.shape == (64, 256 // fsdp)
  else:
    assert _fsdp_split(state.params) == 0 and _fsdp_split(inputs) == 0
  one_params, one_losses = one_device
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  assert_params_match(one_params, jax.device_get(state.params))
  # The params moved: the comparison is not vacuous.
  name = ("encoder", "blocks_0", "mlp", "fc1", "kernel")
  moved = lambda tree: np.asarray(functools.reduce(lambda t, k: t[k], name, tree))
  assert np.abs(moved(one_params) - moved(init.params)).max() > LR / 2
