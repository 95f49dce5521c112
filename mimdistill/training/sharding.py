"""Device mesh and shardings: data parallel, optionally FSDP for params.

The mesh has two axes, `('data', 'fsdp')`. Batches are split over both (every
device sees a different slice of the batch); params and optimizer state are
replicated unless FSDP is on, in which case each leaf is split along its
largest dimension divisible by the `fsdp` axis size (big_vision's rule), and
small leaves stay replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
# Leaves smaller than this stay replicated: splitting them costs more in
# collectives than it saves in memory.
_MIN_FSDP_SIZE = 2**12


def make_mesh(fsdp: int = 1, devices=None, num_devices: int = 0) -> Mesh:
  """`num_devices` > 0 uses only the first that many devices."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if not isinstance(num_devices, int) or not 0 <= num_devices <= devices.size:
    raise ValueError(
      f"mesh.num_devices={num_devices!r} must be in 0..{devices.size}, the devices visible "
      "(0 = all of them)"
    )
  if num_devices:
    devices = devices[:num_devices]
  n = devices.size
  if fsdp < 1 or n % fsdp:
    raise ValueError(
      f"mesh.fsdp={fsdp} must divide the {n} devices; pick a "
      f"divisor of {n} (1 = pure data parallel)"
    )
  return Mesh(devices.reshape(n // fsdp, fsdp), BATCH_AXES)


def mesh_from_config(config) -> Mesh:
  """The mesh of a stage config's `mesh` section (`fsdp`, `num_devices`)."""
  return make_mesh(config.mesh.get("fsdp", 1), num_devices=config.mesh.get("num_devices", 0))


def fsdp_size(mesh: Mesh) -> int:
  """Devices params are split over (1: replicated, pure data parallel)."""
  return int(mesh.shape[FSDP])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh, what: str = "batch_size"):
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
      f"global {what}={global_batch} is not divisible by the {n} devices; "
      f"use a multiple of {n} (e.g. {max(n, global_batch // n * n)})"
    )


def _fsdp_spec(shape: tuple[int, ...], size: int) -> P:
  if size == 1 or int(np.prod(shape, dtype=np.int64)) < _MIN_FSDP_SIZE:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % size == 0:
      spec = [None] * len(shape)
      spec[axis] = FSDP
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
  """NamedSharding per leaf (works on arrays or ShapeDtypeStructs)."""
  size = mesh.shape[FSDP]

  def one(x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, _fsdp_spec(shape, size) if fsdp else P())

  return jax.tree_util.tree_map(one, tree)
