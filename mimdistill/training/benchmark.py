"""Measuring a stage's training step and its input pipeline.

`measure_step(config, build)` takes the stage's own `Task` on a random
batch (`build(config, steps_per_epoch)`, i.e. `stages.registry.synthetic`,
the same builders `stage.run` uses), sets it up exactly as the shared loop
does (`loop.prepare`: sharded state, jitted donated update), places the
batch with the mesh's batch sharding (so the figure is the model step, not
the input pipeline), and measures:

  * lowering and compile time of the update step;
  * step time over `steps` steps after `warmup` ones, each step waited for
    with `block_until_ready` (median, p10, p90), images/s;
  * FLOPs from XLA's cost analysis of the compiled step (per device for a
    sharded step; forward + backward + optimizer, and a rematerialised
    forward counted again), per image, achieved TFLOP/s and MFU against
    `peak_flops` (none on CPU);
  * memory: the peak the device reports (`memory_stats()`, GPU/TPU) and XLA's
    static estimate of the compiled step (arguments, outputs, temporaries).

`measure_input(config)` times the real input pipeline of the stage alone
(host numpy batches, the configured `data.num_workers`).

Each returns one JSON-able record; `format_table` prints several side by side.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from mimdistill import host_allocator
from mimdistill.data import input_pipeline
from mimdistill.training import loop as loop_lib
from mimdistill.training import peak_flops as peak_lib
from mimdistill.training import run_config
from mimdistill.training import sharding as shard_lib

# Only the learning-rate schedule depends on it; a step costs the same.
STEPS_PER_EPOCH = 1000
STEP_KEYS = (
  "benchmark",
  "stage",
  "preset",
  "variant",
  "device_kind",
  "num_devices",
  "mesh",
  "global_batch",
  "image_size",
  "dtype",
  "fused_attention",
  "remat",
  "scan_blocks",
  "compile_s",
  "lower_s",
  "steps",
  "warmup",
  "step_s_median",
  "step_s_p10",
  "step_s_p90",
  "process_cpu_s_median",
  "minor_faults_per_step",
  "host_malloc",
  "images_per_s",
  "images_per_s_per_device",
  "flops_per_step",
  "gflops_per_image",
  "tflops_per_s",
  "tflops_per_s_per_device",
  "peak_tflops_per_device",
  "mfu",
  "mfu_calibrated",
  "peak_memory_bytes",
  "xla_memory",
  "host_load_1m",
  "notes",
)
INPUT_KEYS = (
  "benchmark",
  "stage",
  "preset",
  "variant",
  "dataset",
  "augment",
  "num_workers",
  "global_batch",
  "image_size",
  "first_batch_s",
  "batches",
  "batch_s_mean",
  "batch_s_median",
  "batch_s_p10",
  "batch_s_p90",
  "images_per_s",
  "h2d_bytes_per_image",
  "host_cpus",
  "host_load_1m",
)


# -----------------------------------------------------------------------------
# Measuring
# -----------------------------------------------------------------------------
def _without_scan(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = copy.deepcopy(config)
  for section in ("model", "student", "teacher"):
    if section in config and "scan_blocks" in config[section]:
      config[section].scan_blocks = False
  return config


def _percentile(values, q: float) -> float:
  return float(np.percentile(np.asarray(values, np.float64), q))


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # a backend without cost analysis
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _xla_memory(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
  )
  return {
    f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f)) for f in fields if hasattr(m, f)
  }


def _peak_memory(devices) -> int | None:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _minor_faults() -> int | None:
  try:
    import resource
  except ImportError:  # not on POSIX
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _load() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def measure_step(
  config: ml_collections.ConfigDict,
  build: Callable[[ml_collections.ConfigDict, int], Any],
  *,
  steps: int = 10,
  warmup: int = 2,
  mesh=None,
  variant: str = "",
  calibrated: dict | None = None,
) -> dict:
  """One record for the training step of `config` (see the module doc);
  `build(config, steps_per_epoch)` returns the stage's `Synthetic` task;
  `calibrated` (`peak_flops.calibrate`) adds the step's FLOP/s as a fraction
  of the measured matmul rate (`mfu_calibrated`)."""
  check_counts(steps, warmup)
  mesh = mesh or shard_lib.mesh_from_config(config)
  built = build(config, STEPS_PER_EPOCH)

  # -- state, inputs and batch, placed exactly as the loop places them -------
  prep = loop_lib.prepare(built.task, mesh, jax.random.PRNGKey(config.seed))
  state = prep.init_state()
  per_process = config.batch_size // jax.process_count()
  start = jax.process_index() * per_process
  batch = prep.place_batch({k: v[start : start + per_process] for k, v in built.batch.items()})
  inputs = prep.inputs

  # -- compile ----------------------------------------------------------------
  t0 = time.perf_counter()
  lowered = prep.update.lower(state, batch, inputs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  flops = _flops(compiled)
  scanned = built.info.get("scan_blocks") or built.info.get("teacher_scan_blocks")
  if scanned:
    # XLA's cost analysis counts a while-loop body once, so a scanned block
    # stack would show one block's FLOPs: count the same step unrolled (same
    # params and shapes; compiled only to be counted, never run).
    unrolled = loop_lib.prepare(build(_without_scan(config), STEPS_PER_EPOCH).task, mesh, prep.rng)
    flops = _flops(unrolled.update.lower(state, batch, unrolled.inputs).compile())

  # -- run --------------------------------------------------------------------
  for _ in range(warmup):
    state, metrics = compiled(state, batch, inputs)
  jax.block_until_ready(state)
  times, cpu = [], []
  faults = _minor_faults()
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch, inputs)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  faults = None if faults is None else (_minor_faults() - faults) / steps
  loss = float(jax.device_get(metrics["loss"]))

  # -- report -----------------------------------------------------------------
  n = mesh.devices.size
  median = statistics.median(times)
  device_kind = mesh.devices.flat[0].device_kind
  dtype = config.dtype
  peak = peak_lib.peak_flops(device_kind, dtype, jax.config.jax_default_matmul_precision)
  per_device = flops / median if flops is not None else None
  notes = list(built.notes)
  if not np.isfinite(loss):
    notes.append(f"loss is {loss} (synthetic data)")
  if built.info.get("remat"):
    notes.append("remat: XLA's FLOPs include the recomputed forward")
  if scanned:
    notes.append("scan_blocks: FLOPs counted on the unrolled step")
  record = {
    "benchmark": "train_step",
    "stage": built.stage,
    "preset": config.get("preset"),
    "variant": variant,
    "device_kind": device_kind,
    "num_devices": n,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "global_batch": int(config.batch_size),
    "image_size": built.info["image_size"],
    "dtype": dtype,
    "fused_attention": built.info["fused_attention"],
    "remat": built.info["remat"],
    "scan_blocks": built.info["scan_blocks"],
    **{
      k: v
      for k, v in built.info.items()
      if k not in ("image_size", "fused_attention", "remat", "scan_blocks")
    },
    "compile_s": round(t2 - t1, 3),
    "lower_s": round(t1 - t0, 3),
    "steps": steps,
    "warmup": warmup,
    "step_s_median": median,
    "step_s_p10": _percentile(times, 10),
    "step_s_p90": _percentile(times, 90),
    # CPU time of this process per step (all threads): on the CPU backend
    # a load-independent companion of the wall time on a shared host.
    "process_cpu_s_median": statistics.median(cpu),
    # Page faults of this process per step: on the CPU, XLA's temp buffer
    # faulted in afresh each step unless `host_allocator` keeps it mapped.
    "minor_faults_per_step": faults,
    "host_malloc": host_allocator.state,
    "images_per_s": config.batch_size / median,
    "images_per_s_per_device": config.batch_size / median / n,
    # cost_analysis of an SPMD step is the per-device program.
    "flops_per_step": None if flops is None else flops * n,
    "gflops_per_image": (None if flops is None else flops * n / config.batch_size / 1e9),
    "tflops_per_s": None if per_device is None else per_device * n / 1e12,
    "tflops_per_s_per_device": None if per_device is None else per_device / 1e12,
    "peak_tflops_per_device": None if peak is None else peak / 1e12,
    "mfu": None if (peak is None or per_device is None) else per_device / peak,
    **(calibrated or {}),
    "mfu_calibrated": None
    if (not calibrated or per_device is None)
    else per_device / calibrated["calibrated_flops_per_s"],
    "peak_memory_bytes": _peak_memory(mesh.local_devices),
    "xla_memory": _xla_memory(compiled),
    "final_loss": loss,
    "host_load_1m": _load(),
    "notes": notes,
  }
  return record


def _stage(config) -> str:
  stage = config.get("stage")
  if stage not in ("pretrain", "distill", "finetune"):
    raise ValueError(
      f"config.stage={stage!r}: the input benchmark knows 'pretrain', 'distill' and 'finetune'"
    )
  return stage


def _input_data_config(config, stage: str):
  if stage in ("pretrain", "distill"):
    return run_config.data_config(config, "mae" if stage == "pretrain" else "distill")
  augment = "linprobe" if config.mode == "linprobe" else "finetune"
  return run_config.data_config(config, augment)


def measure_input(
  config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2, variant: str = ""
) -> dict:
  """Images/s the stage's real train input pipeline delivers on this host
  (numpy batches, before any device transfer)."""
  check_counts(steps, warmup)
  stage = _stage(config)
  data = _input_data_config(config, stage)
  t0 = time.perf_counter()
  pipeline = input_pipeline.make_dataset(
    data, split=config.data.train_split, train=True, seed=config.seed
  )
  it = iter(pipeline)
  try:
    batch = next(it)
    first = time.perf_counter() - t0
    # What crosses to the devices per image: every array of the batch.
    h2d = sum(np.asarray(v).nbytes for v in batch.values()) / pipeline.local_batch_size
    dtypes = {k: str(np.asarray(v).dtype) for k, v in batch.items()}
    for _ in range(warmup):
      next(it)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      next(it)
      times.append(time.perf_counter() - t)
  finally:
    it.close()
  total = sum(times)
  return {
    "benchmark": "input",
    "stage": stage,
    "preset": config.get("preset"),
    "variant": variant,
    "dataset": data.name,
    "augment": data.augment,
    "num_workers": int(data.get("num_workers", 0)),
    "global_batch": int(config.batch_size),
    "local_batch": pipeline.local_batch_size,
    "image_size": int(data.image_size),
    "first_batch_s": round(first, 3),
    "batches": steps,
    "batch_s_mean": total / steps,
    "batch_s_median": statistics.median(times),
    "batch_s_p10": _percentile(times, 10),
    "batch_s_p90": _percentile(times, 90),
    "images_per_s": steps * pipeline.local_batch_size / total,
    "h2d_bytes_per_image": h2d,
    "batch_dtypes": dtypes,
    "host_cpus": os.cpu_count(),
    "host_load_1m": _load(),
  }


# -----------------------------------------------------------------------------
# Variants and the table
# -----------------------------------------------------------------------------
def check_counts(steps: int, warmup: int) -> None:
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")


def check_options(*, steps: int, warmup: int, calibrate_size: int, json_out: str | None) -> None:
  """The benchmark command's own flags, before any config is built or any
  step compiles: a JSON file whose folder is missing would otherwise fail
  only after the first measurement had run."""
  check_counts(steps, warmup)
  if calibrate_size and calibrate_size < peak_lib.MIN_CALIBRATION_SIZE:
    raise ValueError(
      f"--calibrate_size={calibrate_size} must be 0 (the device's default) or >= "
      f"{peak_lib.MIN_CALIBRATION_SIZE}: a smaller matmul does not reach the matmul units' rate"
    )
  if json_out:
    folder = os.path.dirname(os.path.abspath(json_out))
    if os.path.isdir(json_out) or not os.path.isdir(folder):
      raise ValueError(
        f"--json_out={json_out}: "
        + ("is a folder" if os.path.isdir(json_out) else f"folder {folder} does not exist")
        + "; pass a file path in an existing folder"
      )


def _parse_value(current, text: str):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"{text!r} is not a bool (true/false)")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  return text


def parse_sweeps(sweeps) -> list[tuple[str, list[str]]]:
  """['dtype=float32,bfloat16', ...] -> [('dtype', ['float32', 'bfloat16'])]."""
  out = []
  for sweep in sweeps or ():
    key, sep, values = sweep.partition("=")
    if not sep or not key or not values:
      raise ValueError(
        f"--sweep {sweep!r}: use key=value1,value2 (a config field, e.g. dtype=float32,bfloat16)"
      )
    out.append((key.strip(), [v.strip() for v in values.split(",")]))
  return out


def variants(
  config: ml_collections.ConfigDict, sweeps
) -> list[tuple[str, ml_collections.ConfigDict]]:
  """The config once per combination of the sweeps (cartesian product).

  A sweep key may name several fields joined by '+', which take each value
  together (e.g. `student.fused_attention+teacher.fused_attention=false,true`).
  """
  if "stages" in config and "stage" not in config:
    # a pipeline config has no step of its own: it failed as a bare 'mesh'
    sections = [k for k in config.keys() if hasattr(config[k], "get") and config[k].get("stage")]
    raise ValueError(
      f"--config {config.get('preset', '')!r} is a pipeline config; the benchmark times one "
      f"stage's step: pass a stage config (e.g. configs/tinymim_distill.py:quickstart), the "
      f"stages here being {', '.join(sections)}"
    )
  combos: list[list[tuple[str, str]]] = [[]]
  for key, values in parse_sweeps(sweeps):
    combos = [c + [(key, v)] for c in combos for v in values]
  out = []
  for combo in combos:
    c = copy.deepcopy(config)
    for keys, text in combo:
      for key in keys.split("+"):
        _set_field(c, key, text)
    out.append((" ".join(f"{k}={v}" for k, v in combo), c))
  return out


def _set_field(c: ml_collections.ConfigDict, key: str, text: str) -> None:
  *path, leaf = key.split(".")
  node = c
  for p in path:
    if p not in node:
      raise ValueError(f"--sweep {key}: the config has no field {key!r}")
    node = node[p]
  if leaf not in node:
    raise ValueError(f"--sweep {key}: the config has no field {key!r}")
  current = node[leaf]
  if current is None:  # a placeholder(int) such as width
    current = 0 if text.lstrip("-").isdigit() else ""
  try:
    node[leaf] = _parse_value(current, text)
  except ValueError as e:
    kind = "an integer" if isinstance(current, int) else "a number"
    detail = str(e) if isinstance(current, bool) else f"{text!r} is not {kind}"
    raise ValueError(f"--sweep {key}={text}: {detail} ({key} is {current!r})") from None


def _fmt(x, spec: str, none: str = "-") -> str:
  return none if x is None else format(x, spec)


def _bytes(x) -> str:
  if x is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(x) < 1024 or unit == "TiB":
      return f"{x:.1f} {unit}" if unit != "B" else f"{x} B"
    x /= 1024
  return str(x)


# Record key -> its short name in the table's options column.
_OPTION_NAMES = (
  ("fused_attention", "fused"),
  ("remat", "remat"),
  ("scan_blocks", "scan"),
  ("teacher_fused_attention", "teacher fused"),
  ("teacher_scan_blocks", "teacher scan"),
)


def _speed_options(record: dict) -> str:
  """The speed options a step record was measured with, e.g. 'remat,scan'."""
  return ",".join(name for key, name in _OPTION_NAMES if record.get(key)) or "-"


def format_table(records: list[dict]) -> str:
  """A short human-readable table of step and input records."""
  lines = []
  steps = [r for r in records if r.get("benchmark") == "train_step"]
  if steps:
    head = (
      "variant",
      "options",
      "compile s",
      "step ms p50 [p10-p90]",
      "cpu ms",
      "faults/step",
      "img/s",
      "GFLOP/img",
      "TFLOP/s",
      "MFU",
      "MFU calib.",
      "peak mem",
      "XLA temp",
    )
    rows = []
    for r in steps:
      mem = r.get("xla_memory") or {}
      rows.append(
        (
          r.get("variant") or r.get("preset") or r["stage"],
          _speed_options(r),
          f"{r['compile_s']:.1f}",
          f"{r['step_s_median'] * 1e3:.1f} [{r['step_s_p10'] * 1e3:.1f}-"
          f"{r['step_s_p90'] * 1e3:.1f}]",
          f"{r['process_cpu_s_median'] * 1e3:.0f}",
          _fmt(r.get("minor_faults_per_step"), ".0f"),
          f"{r['images_per_s']:.1f}",
          _fmt(r["gflops_per_image"], ".3g"),
          _fmt(r["tflops_per_s"], ".3g"),
          _fmt(r["mfu"] if r["mfu"] is None else 100 * r["mfu"], ".1f")
          + ("%" if r["mfu"] is not None else ""),
          _fmt(r.get("mfu_calibrated") and 100 * r["mfu_calibrated"], ".1f")
          + ("%" if r.get("mfu_calibrated") is not None else ""),
          _bytes(r["peak_memory_bytes"]),
          _bytes(mem.get("temp_bytes")),
        )
      )
    lines += _table(head, rows)
    r0 = steps[0]
    lines.append(
      f"{r0['stage']} {r0.get('model', '')}; {r0['num_devices']} x "
      f"{r0['device_kind']}, mesh {r0['mesh']}, batch "
      f"{r0['global_batch']}, {r0['steps']} timed steps after "
      f"{r0['warmup']}; host load {r0['host_load_1m']}"
    )
  inputs = [r for r in records if r.get("benchmark") == "input"]
  if inputs:
    if lines:
      lines.append("")
    head = (
      "variant",
      "dataset",
      "augment",
      "workers",
      "first batch s",
      "batch ms mean [p10-p90]",
      "img/s",
      "bytes/img to device",
    )
    rows = [
      (
        r.get("variant") or r.get("preset") or r["stage"],
        r["dataset"],
        r["augment"],
        str(r["num_workers"]),
        f"{r['first_batch_s']:.2f}",
        f"{r['batch_s_mean'] * 1e3:.1f} [{r['batch_s_p10'] * 1e3:.1f}-"
        f"{r['batch_s_p90'] * 1e3:.1f}]",
        f"{r['images_per_s']:.1f}",
        f"{r['h2d_bytes_per_image']:.0f}",
      )
      for r in inputs
    ]
    lines += _table(head, rows)
    lines.append(f"host: {inputs[0]['host_cpus']} CPUs, load {inputs[0]['host_load_1m']}")
  return "\n".join(lines)


def _table(head, rows) -> list[str]:
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
  return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
