"""The benchmark command and the speed options (no timing assertions).

* `launch/benchmark.py` runs for each stage's quickstart config (tiny
  overrides, 2 steps) and prints one valid JSON line per measurement with
  the expected keys, then a table; a distillation teacher without a source
  is randomly initialised and the output says so;
* `--input_only`'s measurement of the real input pipeline;
* the speed options keep the params layout and the numerics: remat is
  exact, fused attention matches plain attention, bfloat16 keeps float32
  params and float32 losses;
* the peak FLOP/s table.
"""

import functools
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_DEVICE_XLA_FLAGS, REPO, set_path

from mimdistill import host_allocator
from mimdistill.models.tinymim import DistillStudent
from mimdistill.stages import distill, registry
from mimdistill.training import benchmark, peak_flops

sys.path.insert(0, str(REPO))
from configs import tinymim_distill  # noqa: E402

TINY = {
  "pretrain": [
    "--config.model.width=32",
    "--config.model.depth=1",
    "--config.model.num_heads=2",
    "--config.model.patch_size=8",
    "--config.model.decoder.width=32",
    "--config.model.decoder.depth=1",
    "--config.model.decoder.num_heads=2",
  ],
  "distill": [
    "--config.teacher.width=32",
    "--config.teacher.depth=1",
    "--config.teacher.num_heads=2",
    "--config.teacher.patch_size=8",
    "--config.student.width=32",
    "--config.student.depth=1",
    "--config.student.num_heads=2",
    "--config.student.patch_size=8",
    "--config.teacher.source=",
    "--sweep",
    "dtype=float32,bfloat16",
  ],
  "finetune": [
    "--config.model.width=32",
    "--config.model.depth=1",
    "--config.model.num_heads=2",
    "--config.model.patch_size=8",
    "--config.num_classes=10",
  ],
}
CONFIGS = {
  "pretrain": "mae_pretrain.py",
  "distill": "tinymim_distill.py",
  "finetune": "finetune.py",
}


def _launch(stage, tfds_dir):
  cmd = [
    sys.executable,
    str(REPO / "launch" / "benchmark.py"),
    "--config",
    str(REPO / "configs" / CONFIGS[stage]) + ":quickstart",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--config.batch_size=8",
    f"--config.data.data_dir={tfds_dir}",
    *TINY[stage],
  ]
  # Timings are not asserted: compile fast (conftest's optimisation level).
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  return subprocess.Popen(
    cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


@pytest.fixture(scope="module")
def cli_outputs(tfds_dir):
  # The three stages run side by side (each process is mostly compiling).
  procs = {stage: _launch(stage, tfds_dir) for stage in CONFIGS}
  out = {}
  for stage, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    out[stage] = stdout
  return out


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_cli_prints_json_lines_and_a_table(cli_outputs, stage):
  stdout = cli_outputs[stage]
  records = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
  assert len(records) == (2 if stage == "distill" else 1)
  for r in records:
    assert set(benchmark.STEP_KEYS) <= set(r), set(benchmark.STEP_KEYS) - set(r)
    assert r["benchmark"] == "train_step" and r["stage"] == stage
    assert r["num_devices"] == 1 and r["global_batch"] == 8
    assert r["step_s_median"] > 0 and r["compile_s"] > 0
    assert r["step_s_p10"] <= r["step_s_median"] <= r["step_s_p90"]
    assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0
    assert r["tflops_per_s"] > 0
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # CPU
    assert np.isfinite(r["final_loss"])
    # launch_flags.start set the CPU host allocator before JAX started.
    cpu_run = host_allocator._accelerator_reason(os.environ) is None
    if cpu_run and sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
      assert r["host_malloc"] == "on", r["host_malloc"]
    assert r["minor_faults_per_step"] >= 0
  assert "compile s" in stdout and "GFLOP/img" in stdout  # the table
  if stage == "distill":
    assert [r["dtype"] for r in records] == ["float32", "bfloat16"]
    assert [r["variant"] for r in records] == ["dtype=float32", "dtype=bfloat16"]
    assert records[0]["teacher"] == "random init"
    assert "teacher: random init" in stdout


def test_input_only_measures_the_pipeline(tfds_dir):
  config = tinymim_distill.get_config("quickstart")
  config.data.data_dir = str(tfds_dir)
  config.batch_size = 32
  record = benchmark.measure_input(config, steps=3, warmup=1)
  assert set(benchmark.INPUT_KEYS) <= set(record)
  assert record["augment"] == "distill" and record["dataset"] == "embedded"
  assert record["num_workers"] == 0 and record["batches"] == 3
  assert record["images_per_s"] > 0
  json.dumps(record)
  assert "img/s" in benchmark.format_table([record])


def test_sweeps_make_one_config_per_combination():
  config = tinymim_distill.get_config("quickstart")
  out = benchmark.variants(config, ["dtype=float32,bfloat16", "student.fused_attention=false,true"])
  assert [name for name, _ in out] == [
    "dtype=float32 student.fused_attention=false",
    "dtype=float32 student.fused_attention=true",
    "dtype=bfloat16 student.fused_attention=false",
    "dtype=bfloat16 student.fused_attention=true",
  ]
  assert out[3][1].student.fused_attention is True
  assert config.dtype == "float32"  # the original is untouched
  (_, off), (name, on) = benchmark.variants(
    config, ["student.fused_attention+teacher.fused_attention=false,true"]
  )
  assert name == "student.fused_attention+teacher.fused_attention=true"
  assert on.student.fused_attention and on.teacher.fused_attention
  assert not off.student.fused_attention and not off.teacher.fused_attention
  assert benchmark.variants(config, ["teacher.block=2"])[0][1].teacher.block == 2
  with pytest.raises(ValueError, match="no field"):
    benchmark.variants(config, ["student.nope=1"])
  with pytest.raises(ValueError, match=r"--sweep batch_size=abc: 'abc' is not an integer"):
    benchmark.variants(config, ["batch_size=abc"])
  with pytest.raises(ValueError, match=r"--sweep student.fused_attention=maybe: .*not a bool"):
    benchmark.variants(config, ["student.fused_attention=maybe"])
  # a pipeline config was a bare AttributeError "'mesh'"
  from configs import pipeline as pipeline_configs

  with pytest.raises(ValueError, match="is a pipeline config; the benchmark times one stage's"):
    benchmark.variants(pipeline_configs.get_config("quickstart"), [])


@pytest.mark.parametrize(
  "options, match",
  [
    ({"steps": 0}, "steps=0 must be >= 1"),
    ({"warmup": -1}, "warmup=-1 >= 0"),
    ({"calibrate_size": -5}, "--calibrate_size=-5 must be 0"),
    ({"calibrate_size": 16}, "--calibrate_size=16 must be 0"),
    ({"json_out": "/nonexistent/dir/x.jsonl"}, "folder /nonexistent/dir does not exist"),
    ({"json_out": "."}, "--json_out=.: is a folder"),
  ],
)
def test_bad_benchmark_options_are_refused_before_measuring(options, match):
  """The command's own flags are checked before any config is built: a
  missing --json_out folder used to fail after the first measurement, a
  negative --calibrate_size in jax.random, --input_only --steps=0 in a
  division by zero."""
  kwargs = {"steps": 10, "warmup": 2, "calibrate_size": 0, "json_out": None, **options}
  with pytest.raises(ValueError, match=match):
    benchmark.check_options(**kwargs)
  benchmark.check_options(steps=1, warmup=0, calibrate_size=256, json_out="x.jsonl")
  with pytest.raises(ValueError, match="steps=0 must be >= 1"):
    benchmark.measure_input(tinymim_distill.get_config("quickstart"), steps=0)


# -----------------------------------------------------------------------------
# Speed options
# -----------------------------------------------------------------------------
def _tiny_distill_config(options=()):
  c = tinymim_distill.get_config("quickstart")
  c.teacher.update(width=32, depth=2, num_heads=2, patch_size=8, source="")
  c.student.update(width=32, depth=2, num_heads=2, patch_size=8)
  for key, value in options:
    set_path(c, key, value)
  return c


@functools.cache
def _variables():
  """Teacher and student variables: the options change no param, so one
  initialisation (jitted: eager init is slower) serves every variant."""
  c = _tiny_distill_config()
  dummy = jnp.zeros((1, 32, 32, 3))
  teacher, student = distill.build_teacher(c), distill.build_student(c)
  t_vars = jax.jit(teacher.init)(jax.random.PRNGKey(1), dummy)
  s_vars = jax.jit(functools.partial(student.init, method=DistillStudent.init_all))(
    jax.random.PRNGKey(2), dummy
  )
  return t_vars, s_vars


def _student_grads(**options):
  return _student_grads_cached(tuple(sorted(options.items())))


@functools.cache
def _student_grads_cached(options):
  """Loss and gradient of the distillation loss for the tiny student with
  `options` ((config path, value), ...); same teacher and student weights."""
  c = _tiny_distill_config(options)
  t_vars, s_vars = _variables()
  teacher, student = distill.build_teacher(c), distill.build_student(c)
  # The layout the options' modules would create is the shared one.
  abstract = jax.eval_shape(
    functools.partial(student.init, method=DistillStudent.init_all),
    jax.random.PRNGKey(2),
    jnp.zeros((1, 32, 32, 3)),
  )
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(s_vars)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  loss_fn = distill.make_loss_fn(distill.make_plan(c), student, teacher)
  batch = {"image": images, "image_student": images * 0.9}

  def loss(params):
    return loss_fn(params, {"fixed": s_vars["fixed"]}, batch, jax.random.PRNGKey(3), t_vars)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(s_vars["params"])
  return abstract["params"], value, grads


def test_remat_and_fused_attention_keep_layout_and_numerics():
  params, loss, grads = _student_grads()
  params2, loss2, grads2 = _student_grads(
    **{"student.remat": True, "student.fused_attention": True, "teacher.fused_attention": True}
  )
  # Same param names (blocks_<i>) and shapes: checkpoints stay compatible.
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params2)
  assert "blocks_1" in params["encoder"]
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)


def test_scan_blocks_flops_are_those_of_the_unrolled_step():
  # XLA counts a scan body once; the benchmark counts the unrolled step.
  records = []
  for scan in (False, True):
    c = _tiny_distill_config(
      (
        ("student.depth", 3),
        ("teacher.depth", 3),
        ("student.scan_blocks", scan),
        ("teacher.scan_blocks", scan),
      )
    )
    c.batch_size = 8
    c.mesh.num_devices = 1
    records.append(benchmark.measure_step(c, registry.synthetic, steps=1, warmup=0))
  plain, scanned = records
  assert scanned["scan_blocks"] and scanned["teacher_scan_blocks"]
  assert "scan_blocks: FLOPs counted on the unrolled step" in scanned["notes"]
  np.testing.assert_allclose(scanned["gflops_per_image"], plain["gflops_per_image"], rtol=1e-6)


def test_bfloat16_keeps_float32_params_and_losses():
  params, loss, grads = _student_grads()
  params16, loss16, grads16 = _student_grads(dtype="bfloat16")
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves((params16, grads16))}
  # (params16: the abstract params a bfloat16 model creates)
  assert dtypes == {jnp.dtype(jnp.float32)}
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss, rtol=0.05)


# -----------------------------------------------------------------------------
# Peak FLOP/s
# -----------------------------------------------------------------------------
@pytest.mark.parametrize(
  "kind,dtype,precision,expected",
  [
    ("TPU v4", "bfloat16", None, 275e12),
    ("TPU v5 lite", "bfloat16", None, 197e12),
    ("TPU v5p", "bfloat16", None, 459e12),
    ("TPU v5", "bfloat16", None, 459e12),
    ("TPU v6 lite", "bfloat16", None, 918e12),
    ("TPU v4", "float32", None, 275e12),  # default: one bf16 pass
    ("TPU v4", "float32", "highest", None),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", None, 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", None, 156e12),  # TF32
    ("NVIDIA A100-SXM4-80GB", "float32", "highest", 19.5e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", None, 989.4e12),
    ("NVIDIA H100 PCIe", "bfloat16", None, 756e12),
    ("NVIDIA H200", "bfloat16", None, 989.4e12),
    ("cpu", "bfloat16", None, None),
    ("Some Future Chip", "bfloat16", None, None),
  ],
)
def test_peak_flops(kind, dtype, precision, expected):
  assert peak_flops.peak_flops(kind, dtype, precision) == expected


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--steps=0", "--steps=0 must be >= 1"),
    ("--batch_size=0", "--batch_size=0 must be >= 1"),
    ("--image_size=100", "--image_size=100 must be a multiple of the patch size 16"),
  ],
)
def test_official_step_refuses_bad_counts_before_importing_torch(flag, message, tmp_path):
  """The side-by-side tool's counts are checked when parsed, before torch
  and the official models are loaded (--steps=0 left no step to time)."""
  (tmp_path / "models_tinymim.py").write_text("")
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch", "official_step.py")
  cmd = [sys.executable, script, f"--official_dir={tmp_path}", flag]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and message in out.stderr, out.stderr[-1000:]
