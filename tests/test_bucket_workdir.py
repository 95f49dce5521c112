"""A gs:// workdir (what a Cloud TPU pod runs with) works like a local one.

There is no network here, so Cloud Storage is played by a local folder: fsspec's
'gs'/'gcs' protocols (what etils.epath uses behind gs://) are served by a
DirFileSystem over that folder, and Orbax's TensorStore spec for a bucket is
pointed at the same folder. Everything above that layer is the real code: the
pipeline, Orbax checkpoints, metrics, TensorBoard events, figures, lineage,
resume, reading a bucket workdir as a teacher and converting from it.
"""

import importlib
import importlib.util
import json

import pytest
from conftest import tiny_pipeline_config
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from mimdistill import paths
from mimdistill.interop import conversion as convert
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.stages.pipeline import run_pipeline
from mimdistill.training import checkpoints as ckpt_lib
from mimdistill.training.metrics import read_metrics_lines

BUCKET = "gs://test-bucket/pipe"
# The mutable registry (the package's `fsspec.registry` is a read-only view).
_FSSPEC_REGISTRY = importlib.import_module("fsspec.registry")._registry


class _LocalBucket(DirFileSystem):
  """Cloud Storage played by a local folder (`root`, set by the fixture)."""

  protocol = ("gs", "gcs")
  cachable = False
  root = None

  def __init__(self, *args, **kwargs):
    super().__init__(path=str(self.root), fs=LocalFileSystem(auto_mkdir=True))

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return path[len(prefix) :]
    return path


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The local folder that holds what is written under gs://."""
  root = tmp_path_factory.mktemp("bucket")
  _LocalBucket.root = root
  with pytest.MonkeyPatch.context() as mp:
    for name in ("gs", "gcs"):
      mp.setitem(_FSSPEC_REGISTRY, name, _LocalBucket)
    mp.setattr(
      gcs_utils,
      "get_kvstore_for_gcs",
      lambda path: {"driver": "file", "path": str(root / str(path)[5:])},
    )
    # Orbax asks google-cloud-storage whether the bucket has folders.
    mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def bucket_pipeline(bucket, tfds_dir, tmp_path_factory):
  cwd = tmp_path_factory.mktemp("cwd")
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(cwd)
    summary = run_pipeline(tiny_pipeline_config(tfds_dir), BUCKET)
  return summary, bucket / "test-bucket" / "pipe", cwd


def test_pipeline_writes_everything_into_the_bucket(bucket_pipeline):
  summary, local, cwd = bucket_pipeline
  assert not any(cwd.iterdir()), "nothing may land in a local ./gs: folder"
  assert summary["workdir"] == BUCKET
  for name, steps in (("pretrain", 4), ("distill", 4), ("finetune", 4)):
    stage = local / name
    assert (stage / "checkpoints" / str(steps) / "state" / "_METADATA").is_file(), name
    assert (stage / "checkpoints" / str(steps) / "data").is_dir(), name
    for record in ("config.json", "lineage.json", "stage_done.json"):
      assert (stage / record).is_file(), (name, record)
    # Objects cannot be appended to: the metrics are numbered parts, each
    # holding only what its flush added (no object is rewritten).
    assert not (stage / "metrics.jsonl").exists()
    parts = sorted(stage.glob("metrics.jsonl.*"))
    assert parts and parts[0].name == "metrics.jsonl.000001", name
    lines = [json.loads(l) for l in read_metrics_lines(stage / "metrics.jsonl")]
    assert sum(len(p.read_text().splitlines()) for p in parts) == len(lines)
    assert [l["step"] for l in lines if l["prefix"] == "train"] == list(range(1, steps + 1))
    events = list((stage / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 100, name
  for png in (
    "pretrain/reconstructions.png",
    "distill/relation_maps.png",
    "finetune/learning_curves.png",
    "finetune/confusion_matrix.png",
  ):
    assert (local / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
  assert (local / "finetune" / "best").is_dir()
  parents = [s["lineage"]["parent"]["path"] for s in summary["stages"][1:]]
  assert parents == [f"{BUCKET}/pretrain/checkpoints/4", f"{BUCKET}/distill/checkpoints/4"]
  assert json.loads((local / "summary.json").read_text())["workdir"] == BUCKET


def test_rerun_skips_finished_stages_and_a_longer_stage_resumes(bucket_pipeline, tfds_dir, caplog):
  summary, local, _ = bucket_pipeline
  again = run_pipeline(tiny_pipeline_config(tfds_dir), BUCKET)
  assert all(s.get("skipped") for s in again["stages"])
  # Stage 1 asked for more steps in the same bucket workdir resumes at 4.
  config = tiny_pipeline_config(tfds_dir).pretrain
  config.total_steps = 6
  config.checkpoint_every = 6
  from mimdistill.stages import pretrain

  with caplog.at_level("INFO"):
    pretrain.run(config, f"{BUCKET}/pretrain")
  assert f"resumed pretrain from step 4 of {BUCKET}/pretrain" in caplog.text
  steps = [json.loads(l)["step"] for l in read_metrics_lines(local / "pretrain" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert ckpt_lib.Checkpointer(f"{BUCKET}/pretrain", every_steps=1).latest_step() == 6


def test_bucket_workdir_as_source(bucket_pipeline, tmp_path):
  _, local, _ = bucket_pipeline
  encoder, record = restore_subtree(f"{BUCKET}/distill", ("params", "encoder"))
  assert record == {"path": f"{BUCKET}/distill/checkpoints/4", "step": 4}
  out = tmp_path / "student.safetensors"
  report = convert.convert(f"{BUCKET}/distill", str(out))
  assert out.stat().st_size > 0 and report.to_json()
  tensors, _ = convert.read_safetensors(str(out))
  assert tensors["blocks.0.attn.qkv.weight"].shape == tuple(
    encoder["blocks_0"]["attn"]["qkv"]["kernel"].shape[::-1]
  )
  with pytest.raises(ValueError, match="convert to a local path, then copy it"):
    convert.convert(str(out), f"{BUCKET}/copy.safetensors")


def test_bad_bucket_paths_are_named():
  with pytest.raises(ValueError, match="only local paths and gs:// buckets"):
    paths.as_path("s3://bucket/run")
  with pytest.raises(ValueError, match="must be on a local disk"):
    from mimdistill.stages.sources import read_encoder

    read_encoder("gs://bucket/mae_pretrain_vit_large.pth", what="teacher.source")


def test_missing_gcsfs_is_named(monkeypatch):
  if importlib.util.find_spec("gcsfs") is not None:
    pytest.skip("gcsfs is installed here, so the error cannot happen")
  for name in ("gs", "gcs"):  # undo the module's local bucket, if registered
    monkeypatch.delitem(_FSSPEC_REGISTRY, name, raising=False)
  with pytest.raises(ImportError, match=r"mimdistill\[gcs\]"):
    paths.as_path("gs://bucket/run")
