"""glibc malloc settings that keep XLA:CPU's per-step temp buffer mapped.

XLA:CPU mallocs an executable's temp buffer on every execution and frees it
afterwards (586 MB for the `s_from_b` distillation step at 224 px, batch 4).
glibc serves a block that large with a fresh `mmap` in the calling thread's
arena and unmaps it on free, so every step page-faults the whole buffer in
again: 144,000 minor faults and 0.3-0.5 s of kernel time per `s_from_b`
step on 2 cores, 15-20% of the step. With one arena, no `mmap` for large
blocks and no trimming of the heap's top, the freed block stays in the heap
and the next step gets it back already mapped (0 faults per step, 0.01 s
of kernel time). The heap grows over the first few steps (small live blocks
land between the big ones) until every step finds its blocks free.

The settings must be made before JAX starts its threads (a thread keeps the
arena it first allocated from), which is why `launch_flags.start` calls
`keep_freed_memory()` before it imports JAX; a script of one's own calls it
before importing JAX (in a notebook kernel, whose threads already hold
arenas of their own, it may not take).
They apply only to CPU runs: on a GPU or TPU the temp buffer lives in device
memory under XLA's own allocator, and a single arena could serialise the host
threads of a large host's input pipeline. The cost on the CPU is that freed
memory is kept for reuse rather than returned to the system: the resident
size stays at the peak the steps need, plus that early fragmentation.
`MIMDISTILL_HOST_MALLOC=default` leaves glibc's defaults ('on' or unset
applies them; any other value is refused).

This is glibc's own `mallopt`; `GLIBC_TUNABLES=glibc.malloc.arena_max=1:
glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647` in the
environment before Python starts does the same for any program.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

# <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it accepts
OPT_OUT = "MIMDISTILL_HOST_MALLOC"

# What the last `keep_freed_memory` call did, for the benchmark record.
state = "not set (launch_flags.start was not called)"


def _accelerator_reason(environ) -> str | None:
  """Why this run may not be a CPU run, or None when it is one."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    others = [p for p in platforms if p != "cpu"]
    return f"JAX_PLATFORMS={','.join(platforms)} names {others[0]}" if others else None
  plugins = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  if importlib.util.find_spec("libtpu") is not None:
    plugins.append("libtpu")
  if plugins:
    return f"accelerator plugin {plugins[0]} installed (JAX_PLATFORMS=cpu forces a CPU run)"
  return None


def _jax_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge

  return xla_bridge.backends_are_initialized()


def keep_freed_memory(environ=None) -> str:
  """Applies the module doc's malloc settings when this is a CPU run on
  glibc and JAX has not started; returns what it did ("on") or why not
  ("off: <reason>"), also kept in `state`."""
  global state
  if state == "on":  # mallopt settings last for the process: a second call changes nothing
    return state
  env = os.environ if environ is None else environ
  reason = None
  choice = env.get(OPT_OUT, "").strip().lower()
  if choice not in ("", "on", "default"):
    # "off", "0", "false" read as opt-outs but would have left the settings on
    raise ValueError(
      f"{OPT_OUT}={env[OPT_OUT]!r} is not a choice: set it to 'default' for glibc's own malloc "
      "settings, or unset it (or 'on') for this module's"
    )
  if choice == "default":
    reason = f"{OPT_OUT}=default"
  elif sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    reason = f"not glibc ({sys.platform}, {platform.libc_ver()[0] or 'unknown libc'})"
  elif _jax_started():
    reason = "JAX already started its threads; call keep_freed_memory() before the first JAX op"
  else:
    reason = _accelerator_reason(env)
  if reason is None:
    libc = ctypes.CDLL(None)
    done = [
      libc.mallopt(M_ARENA_MAX, 1),
      libc.mallopt(M_MMAP_MAX, 0),
      libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ]
    reason = None if all(done) else f"mallopt refused a setting ({done})"
  state = "on" if reason is None else f"off: {reason}"
  return state
