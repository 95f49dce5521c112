"""Test setup: 8 fake CPU devices (set before JAX is imported anywhere) and
the location of the shared fixtures/data, which a user's clone lacks."""

import os
import pathlib
import shutil
import tempfile
import uuid

# 8 fake CPU devices for the multi-device tests. LLVM's optimisation level 0
# for the tests' XLA:CPU kernels: the tiny test models are compile-bound (a
# hetero student's init compiles in 16 s at the default level, 2 s at 0), and
# the level changes neither the HLO passes nor the matmul / convolution
# library calls, only how XLA's own elementwise kernels are vectorised.
# XLA:CPU's older elemental emitter for the fused elementwise kernels instead
# of its MLIR fusion emitters, which run an MLIR pass pipeline per fusion: the
# hetero step (thousands of small fusions, one optimizer chain per leaf)
# compiles in 9 s instead of 18 s. A flag the caller set wins.
_TEST_XLA_FLAGS = {
  "--xla_force_host_platform_device_count": "8",
  "--xla_backend_optimization_level": "0",
  "--xla_cpu_use_fusion_emitters": "false",
}
_given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_given] + [f"{k}={v}" for k, v in _TEST_XLA_FLAGS.items() if k not in _given]
).strip()
# A subprocess's flags (a launch script, a notebook kernel): one CPU device,
# the same compile settings.
ONE_DEVICE_XLA_FLAGS = " ".join(
  f"{k}={v}" for k, v in {**_TEST_XLA_FLAGS, "--xla_force_host_platform_device_count": "1"}.items()
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's xdist workers and the
# launch scripts they start (inherited through the environment): the tiny
# models' programs are compile-bound, and the same program is compiled by
# several tests and by every run of a kill-and-resume test. JAX keys an
# entry by the program, the XLA flags and its own version, so a hit is the
# executable a compile would give. The controller names it before the
# workers start (they inherit it) and deletes it at the end. A cache the
# caller set (JAX_COMPILATION_CACHE_DIR) is used as is and kept.
_OWN_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
_JAX_CACHE = pathlib.Path(
  os.environ.setdefault(
    "MIMDISTILL_TEST_JAX_CACHE",
    str(pathlib.Path(tempfile.gettempdir()) / f"mimdistill-test-jax-cache-{uuid.uuid4().hex}"),
  )
)
if _OWN_JAX_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_JAX_CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_sessionfinish(session):
  if _OWN_JAX_CACHE and not hasattr(session.config, "workerinput"):  # the controller, last
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker per core, at most 4: every worker
  compiles its own programs and holds 8 fake devices' buffers."""
  return max(1, min(os.cpu_count() or 1, 4))


def shared_path(*parts: str) -> pathlib.Path:
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(
      f"{path} is absent: ../shared (fixtures and data from the "
      "developers' checkout) is not next to this clone"
    )
  return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir per test session: the embedded dataset is prepared
  once (seconds) and shared by every test that trains."""
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def data_dir(tfds_dir):
  """`tfds_dir` as a string, with the embedded dataset already prepared."""
  from mimdistill.data import sources

  sources.get_builder("embedded", str(tfds_dir)).prepare()
  return str(tfds_dir)


@pytest.fixture(scope="session")
def cifar10_folder():
  """`folder:<../shared/data/cifar10>`, prepared (60,000 JPEGs, about a
  minute) in the default TFDS data dir: once per machine, and once per
  session when several xdist workers ask at the same time (a file lock;
  the second worker then finds it prepared)."""
  import fcntl

  from mimdistill.data import sources

  name = f"folder:{shared_path('data', 'cifar10')}"
  data_dir = pathlib.Path(sources.get_builder(name, None).data_dir)
  data_dir.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{data_dir}.prepare.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    sources.get_builder(name, None).prepare()
  return name


def data_config(data_dir, augment, **overrides):
  """An input-pipeline config: embedded dataset, 32 px, batch 16, no
  worker processes, seed 0."""
  import ml_collections

  fields = dict(
    name="embedded",
    data_dir=data_dir,
    image_size=32,
    batch_size=16,
    num_workers=0,
    augment=augment,
    seed=0,
  )
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def take(pipeline, n):
  """The first `n` batches of a fresh iterator over `pipeline`."""
  it = iter(pipeline)
  batches = [next(it) for _ in range(n)]
  it.close()
  return batches


def set_path(config, dotted: str, value) -> None:
  """config['a']['b']['c'] = value for dotted = 'a.b.c'."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


# The run fields of a stage's end-to-end test: 3 steps of batch 16, no
# warm-up, a fixed lr, a log line per step, one synchronous checkpoint.
TINY_RUN = dict(
  batch_size=16,
  total_steps=3,
  warmup_epochs=0.0,
  lr=1e-3,
  log_every=1,
  checkpoint_every=3,
  async_checkpoints=False,
)


def tiny_pipeline_overrides(tfds_dir, distill_steps: int = 4) -> dict:
  """`<stage>.<field>: value` for the quickstart pipeline at test size: width
  32, depth 2, patch 8, batch 16, 4 steps per stage."""
  o = {}
  for stage in ("pretrain", "distill", "finetune"):
    o.update(
      {f"{stage}.data.data_dir": str(tfds_dir), f"{stage}.batch_size": 16, f"{stage}.log_every": 1}
    )
  o.update(
    {
      "pretrain.total_steps": 4,
      "pretrain.checkpoint_every": 4,
      "pretrain.num_visualize": 2,
      "distill.total_steps": distill_steps,
      "distill.checkpoint_every": 4,
      "finetune.total_steps": 4,
      "finetune.checkpoint_every": 4,
      "finetune.eval_batch_size": 200,
    }
  )
  for model in ("pretrain.model", "distill.teacher", "distill.student", "finetune.model"):
    o.update(
      {f"{model}.width": 32, f"{model}.depth": 2, f"{model}.num_heads": 2, f"{model}.patch_size": 8}
    )
  o.update(
    {
      "pretrain.model.decoder.width": 32,
      "pretrain.model.decoder.depth": 1,
      "pretrain.model.decoder.num_heads": 2,
    }
  )
  # The first three stages (the quickstart's segmentation stage has tests of its own).
  o["stages"] = "pretrain,distill,finetune"
  return o


def tiny_pipeline_config(tfds_dir, **kwargs):
  """configs/pipeline.py:quickstart with `tiny_pipeline_overrides` applied."""
  import sys

  sys.path.insert(0, str(REPO))
  from configs import pipeline

  config = pipeline.get_config("quickstart")
  for key, value in tiny_pipeline_overrides(tfds_dir, **kwargs).items():
    set_path(config, key, value)
  return config
