"""The CPU host allocator settings (`mimdistill.host_allocator`): XLA:CPU's
temp buffer is reused without page faults once they are on, and they are
never applied where they could not work or would not help."""

import os
import platform
import subprocess
import sys

import jax
import pytest

from mimdistill import host_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A step whose 64 MB intermediate is XLA temp (two matmuls XLA does not fuse):
# glibc maps a block that large afresh on every call by default.
PROGRAM = r"""
import resource, sys
from mimdistill import host_allocator
if sys.argv[1] == "on":
  assert host_allocator.keep_freed_memory() == "on", host_allocator.state
import jax, jax.numpy as jnp
jax.devices()
if sys.argv[1] == "on":  # a second call (a second launch in one process) keeps the record
  assert host_allocator.keep_freed_memory() == "on", host_allocator.state
x = jnp.ones((16384, 256)); w1 = jnp.ones((256, 1024)) / 256; w2 = jnp.ones((1024, 256)) / 1024
f = jax.jit(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2)
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x, w1, w2).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The heap grows for a few calls (small live blocks land between the big
# ones) before every call finds its blocks free: the steady state's median.
print(sorted(faults[6:])[5])
"""


def _faults_per_call(mode: str) -> int:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop(host_allocator.OPT_OUT, None)
  env.pop("XLA_FLAGS", None)  # one CPU device
  out = subprocess.run(
    [sys.executable, "-c", PROGRAM, mode], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(
  sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)
def test_temp_buffer_is_reused_without_page_faults():
  default = _faults_per_call("default")
  if default < 8192:
    pytest.skip(f"this glibc/XLA already reuses the temp buffer ({default} faults per call)")
  kept = _faults_per_call("on")
  # 64 MB of temp is 16,384 pages; kept mapped, a call faults in almost none.
  assert kept < default / 10, (kept, default)


def test_never_applied_where_it_cannot_work_or_would_not_help():
  jax.devices()  # this process's JAX has started: it must refuse, never mallopt
  assert host_allocator.keep_freed_memory({host_allocator.OPT_OUT: "default"}) == (
    "off: MIMDISTILL_HOST_MALLOC=default"
  )
  assert host_allocator.state == "off: MIMDISTILL_HOST_MALLOC=default"
  started = host_allocator.keep_freed_memory({"JAX_PLATFORMS": "cpu"})
  if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
    assert started.startswith("off: JAX already started"), started
  assert host_allocator._accelerator_reason({"JAX_PLATFORMS": "cuda,cpu"}) == (
    "JAX_PLATFORMS=cuda,cpu names cuda"
  )
  assert host_allocator._accelerator_reason({"JAX_PLATFORMS": "cpu"}) is None
  # an opt-out spelled otherwise left the settings on, silently
  with pytest.raises(ValueError, match="MIMDISTILL_HOST_MALLOC='off' is not a choice: set it to"):
    host_allocator.keep_freed_memory({host_allocator.OPT_OUT: "off"})
