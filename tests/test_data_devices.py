"""Placement of input batches on a multi-device mesh (8 fake CPU devices).

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8
before JAX starts; without it these tests are skipped.
"""

import functools

import jax
import numpy as np
import pytest
from conftest import data_config
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mimdistill.data import input_pipeline

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)


make_config = functools.partial(data_config, augment="distill")


def first_batch(pipeline):
  it = iter(pipeline)
  batch = next(it)
  it.close()
  return batch


def test_to_global_shards_the_batch_over_the_data_axis():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch = {
    "image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2),
    "label": np.arange(16, dtype=np.int32),
  }
  placed = input_pipeline.to_global(batch, mesh)
  for key, array in placed.items():
    assert isinstance(array, jax.Array)
    assert array.sharding == NamedSharding(mesh, P("data"))
    assert [s.data.shape[0] for s in array.addressable_shards] == [2] * 8
    np.testing.assert_array_equal(np.asarray(array), batch[key])


def test_pipeline_places_one_global_array_per_field(data_dir):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  config = make_config(data_dir)
  on_devices = first_batch(
    input_pipeline.make_dataset(config, split="train", train=True, mesh=mesh)
  )
  on_host = first_batch(input_pipeline.make_dataset(config, split="train", train=True))
  assert sorted(on_devices) == ["image", "image_student", "label"]
  for key, array in on_devices.items():
    assert isinstance(array, jax.Array)
    assert array.shape == on_host[key].shape
    assert array.sharding.spec == P("data")
    np.testing.assert_array_equal(np.asarray(array), on_host[key])


def test_eval_batches_on_a_two_axis_mesh(data_dir):
  # Batch split over 'data' (4 ways) and replicated over 'model'.
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  config = make_config(data_dir, augment="eval", batch_size=12)
  pipeline = input_pipeline.make_dataset(config, split="test", train=False, mesh=mesh)
  total = 0.0
  for batch in pipeline:
    assert batch["image"].shape == (12, 32, 32, 3)
    assert batch["mask"].sharding.spec == P("data")
    total += float(batch["mask"].sum())
  assert total == 1000


def test_global_batch_must_split_over_the_devices(data_dir):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  with pytest.raises(ValueError, match="batch_size=12 .*8 devices"):
    input_pipeline.make_dataset(
      make_config(data_dir, batch_size=12), split="train", train=True, mesh=mesh
    )
  with pytest.raises(ValueError, match="no data axis 'batch'"):
    input_pipeline.make_dataset(
      make_config(data_dir), split="train", train=True, mesh=mesh, data_axis="batch"
    )
