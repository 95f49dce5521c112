"""Peak dense FLOP/s per device (one chip / one GPU), for MFU.

Vendor figures without structured sparsity. What an XLA float32 matmul runs
at depends on the matmul precision (`jax_default_matmul_precision`):

  * TPU, default precision: one bfloat16 pass with float32 accumulation, so
    float32 compute is measured against the bfloat16 peak; with 'highest' /
    'float32' (6 passes) no peak is given.
  * NVIDIA A100/H100/H200, default precision: TensorFloat-32 tensor cores, so
    float32 compute is measured against the TF32 peak; with 'highest' /
    'float32' against the plain FP32 (CUDA core) peak.
  * CPU and unknown devices: no peak (MFU is not reported).

Device kinds are `jax.devices()[i].device_kind` strings.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Peak:
  name: str
  bfloat16: float
  tfloat32: float | None = None  # GPUs only
  float32: float | None = None  # IEEE float32 (GPU CUDA cores)


_T = 1e12
# Matched in order against the lower-cased device kind (first hit wins, so
# the more specific names come first).
PEAKS: tuple[tuple[str, Peak], ...] = (
  # Cloud TPU, per chip (JAX shows one device per chip on v4/v5e/v5p/v6e).
  ("tpu v6 lite", Peak("TPU v6e", 918 * _T)),
  ("tpu v6e", Peak("TPU v6e", 918 * _T)),
  ("tpu v5 lite", Peak("TPU v5e", 197 * _T)),
  ("tpu v5e", Peak("TPU v5e", 197 * _T)),
  ("tpu v5p", Peak("TPU v5p", 459 * _T)),
  ("tpu v5", Peak("TPU v5p", 459 * _T)),
  ("tpu v4", Peak("TPU v4", 275 * _T)),
  # NVIDIA (dense tensor-core figures from the data sheets).
  ("h200 nvl", Peak("H200 NVL", 835.5 * _T, 417.5 * _T, 60 * _T)),
  ("h200", Peak("H200 SXM", 989.4 * _T, 494.7 * _T, 66.9 * _T)),
  ("h100 nvl", Peak("H100 NVL", 835.5 * _T, 417.5 * _T, 60 * _T)),
  ("h100 pcie", Peak("H100 PCIe", 756 * _T, 378 * _T, 51.2 * _T)),
  ("h100", Peak("H100 SXM", 989.4 * _T, 494.7 * _T, 66.9 * _T)),
  ("a100", Peak("A100", 312 * _T, 156 * _T, 19.5 * _T)),
)

_FULL_PRECISION = ("highest", "float32", "bfloat16_6x")


def lookup(device_kind: str) -> Peak | None:
  kind = device_kind.lower()
  if kind.startswith("cpu"):
    return None
  for key, peak in PEAKS:
    if key in kind:
      return peak
  return None


def peak_flops(
  device_kind: str, dtype: str = "bfloat16", matmul_precision: str | None = None
) -> float | None:
  """Peak FLOP/s of one device for compute `dtype`, or None if unknown.

  `dtype` is the config's compute dtype name ('bfloat16' | 'float32' |
  'float16'); `matmul_precision` is `jax.config.jax_default_matmul_precision`
  (None = the backend default).
  """
  peak = lookup(device_kind)
  if peak is None:
    return None
  if dtype in ("bfloat16", "float16"):
    return peak.bfloat16
  if dtype != "float32":
    raise ValueError(f"dtype={dtype!r}: use 'bfloat16', 'float16' or 'float32'")
  full = (matmul_precision or "").lower() in _FULL_PRECISION
  if peak.tfloat32 is None:  # TPU: default float32 matmuls are 1 bf16 pass
    return None if full else peak.bfloat16
  return peak.float32 if full else peak.tfloat32


# Below this a square matmul is too small to keep a device's matmul units
# busy, so its rate would understate the peak that MFU divides by.
MIN_CALIBRATION_SIZE = 256


def calibrate(
  dtype: str = "float32", size: int | None = None, repeats: int = 10, device=None
) -> dict:
  """The achievable matmul FLOP/s of one device, measured: a jitted
  `size x size` matmul in `dtype` (the run's compute dtype), the median of
  `repeats` timed calls after a warm-up. `size` defaults to 2048 on a CPU and
  8192 on an accelerator, large enough to run at the matmul units' rate. A
  step's FLOP/s over this figure is an MFU for any device, the CPU included,
  where no vendor peak exists."""
  import statistics
  import time

  import jax
  import jax.numpy as jnp

  device = device or jax.devices()[0]
  size = size or (2048 if device.platform == "cpu" else 8192)
  if size < MIN_CALIBRATION_SIZE:
    raise ValueError(f"calibration size={size} must be >= {MIN_CALIBRATION_SIZE}")
  dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[dtype]
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), dt), device) for k in keys)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  seconds = statistics.median(times)
  return {
    "calibrated_flops_per_s": 2 * size**3 / seconds,
    "calibration_size": size,
    "calibration_dtype": dtype,
    "calibration_s": seconds,
  }
