"""The loop's checkpointer on 8 devices in one process: replicated and
sharded arrays are written without per-replica slicing and read back equal,
with their shardings."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mimdistill.training.checkpoints import Checkpointer


def test_one_process_saves_replicated_arrays_whole_and_restores_them(tmp_path, monkeypatch):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = {
    "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), replicated),
    "b": jax.device_put(jnp.arange(8, dtype=jnp.int32), replicated),
    "rows": jax.device_put(jnp.arange(32.0).reshape(16, 2), sharded),
  }
  slices = []
  real_slice = jax.lax.slice_in_dim
  monkeypatch.setattr(
    jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a[0].shape) or real_slice(*a, **k)
  )
  ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
  assert ckpt.save(1, state)
  ckpt.wait()
  # Orbax's replica-parallel default would cut each replicated array into 8.
  assert slices == []
  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  reader = Checkpointer(tmp_path, every_steps=1)
  back = reader.restore(1, abstract)
  reader.close()
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value)
    assert back[key].sharding == value.sharding, key
  ckpt.close()
