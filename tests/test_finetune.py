"""Stage 3 and the pipeline: exact masked evaluation on 8 devices, init from
earlier stages (and the errors around it), kill-and-resume of the pipeline."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ONE_DEVICE_XLA_FLAGS, REPO, tiny_pipeline_overrides

from mimdistill.data import input_pipeline
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.models import factory
from mimdistill.stages import finetune, pretrain
from mimdistill.training import sharding as shard_lib
from mimdistill.training.evaluate import make_evaluator

sys.path.insert(0, str(REPO))
from configs import finetune as finetune_configs  # noqa: E402
from configs import mae_pretrain  # noqa: E402

TINY = dict(width=32, depth=1, num_heads=2, patch_size=8, image_size=32)


def test_eval_on_8_devices_counts_every_example_once(tfds_dir):
  """997 examples, global batch 64 on 8 devices: the padded last batch must
  not count; compare with a plain single-device evaluation."""
  split = "test[:997]"
  model = factory.build("classifier", dict(TINY, variant="custom"), num_classes=10)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  cfg = dict(
    name="embedded",
    data_dir=str(tfds_dir),
    image_size=32,
    batch_size=64,
    augment="eval",
    num_workers=0,
  )
  mesh = shard_lib.make_mesh()
  assert mesh.devices.size == 8
  eval_data = input_pipeline.make_dataset(
    cfg, split=split, train=False, mesh=mesh, data_axis=shard_lib.BATCH_AXES
  )
  evaluator = make_evaluator(lambda v, x: model.apply(v, x), eval_data, num_classes=10)
  got = evaluator(variables)
  assert evaluator(variables) == got and evaluator.compiles == 1  # one compile for every pass

  # Reference: every real example exactly once, numpy top-k.
  host = input_pipeline.make_dataset(cfg, split=split, train=False)
  images, labels = [], []
  for batch in iter(host):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(batch["label"][keep])
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert len(labels) == 997
  logits = np.asarray(jax.jit(model.apply)(variables, images))
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert got["count"] == 997
  np.testing.assert_allclose(got["top1"], np.mean(top5[:, 0] == labels), atol=1e-6)
  np.testing.assert_allclose(got["top5"], np.mean((top5 == labels[:, None]).any(1)), atol=1e-6)
  want = np.zeros((10, 10), np.int64)
  np.add.at(want, (labels, top5[:, 0]), 1)
  np.testing.assert_array_equal(evaluator.last_confusion, want)  # from the same pass


@pytest.fixture(scope="module")
def pretrain_workdir(tfds_dir, tmp_path_factory):
  c = mae_pretrain.get_config("quickstart")
  c.model.update(**TINY)
  c.model.decoder.update(width=32, depth=1, num_heads=2)
  c.data.update(data_dir=str(tfds_dir))
  c.update(
    batch_size=16,
    total_steps=2,
    log_every=1,
    checkpoint_every=2,
    async_checkpoints=False,
    num_visualize=2,
  )
  workdir = tmp_path_factory.mktemp("pre")
  pretrain.run(c, workdir)
  return workdir


def tiny_finetune(tfds_dir, source, **model):
  c = finetune_configs.get_config("quickstart")
  c.model.update(**{**TINY, **model})
  c.init.source = str(source)
  c.data.update(data_dir=str(tfds_dir))
  c.update(
    batch_size=16,
    eval_batch_size=200,
    total_steps=3,
    log_every=1,
    checkpoint_every=3,
    async_checkpoints=False,
  )
  return c


def test_finetune_from_pretrain_workdir(pretrain_workdir, tfds_dir, tmp_path, caplog):
  caplog.set_level("INFO", logger="mimdistill")
  config = tiny_finetune(tfds_dir, pretrain_workdir)
  config.ema_decay = 0.5
  summary = finetune.run(config, tmp_path)
  assert summary["parent"]["path"].endswith("checkpoints/2")
  assert 0.0 <= summary["top1"] <= 1.0 and summary["best_step"] == 3
  assert (tmp_path / "best").is_dir()
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert 0.0 <= final["eval_ema_top1"] <= 1.0  # EMA weights evaluated alongside
  ema, _ = restore_subtree(str(tmp_path), ("ema", "head"))
  head, _ = restore_subtree(str(tmp_path), ("params", "head"))
  assert not np.array_equal(ema["kernel"], head["kernel"])
  lineage = json.loads((tmp_path / "lineage.json").read_text())
  assert lineage["parent"]["step"] == 2
  # The encoder really came from stage 1 (not a fresh init).
  pre, _ = restore_subtree(str(pretrain_workdir), ("params", "encoder", "blocks_0"))
  assert pre["attn"]["qkv"]["kernel"].shape == (32, 96)
  # Its best/ is an init.source like the workdir (it was "no checkpoints in
  # .../best ... run the earlier stage there first").
  again = tiny_finetune(tfds_dir, tmp_path / "best")
  model = finetune.build_model(again, 10)
  taken, record = finetune.init_from_source(finetune.abstract_params(model), again)
  assert record["kind"] == "best" and record["step"] == 3
  last, _ = restore_subtree(str(tmp_path), ("params",))  # the best step is the last here
  for part in ("encoder", "head"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, taken[part], last[part])


def test_finetune_with_other_head_count_and_classes(pretrain_workdir, tfds_dir, tmp_path, caplog):
  """Heads may differ from pre-training (ViT-T: 6 -> 3); a head of another
  class count is re-initialised and logged."""
  caplog.set_level("INFO", logger="mimdistill")
  c = tiny_finetune(tfds_dir, pretrain_workdir, num_heads=4)
  c.num_classes = 12
  finetune.run(c, tmp_path / "a")
  finetune.run(tiny_finetune(tfds_dir, tmp_path / "a"), tmp_path / "b")
  assert "re-initialised" in caplog.text


def test_finetune_errors(pretrain_workdir, tfds_dir, tmp_path):
  with pytest.raises(ValueError, match="another architecture"):
    finetune.run(tiny_finetune(tfds_dir, pretrain_workdir, width=64), tmp_path / "x")
  with pytest.raises(FileNotFoundError, match="no such workdir"):
    finetune.run(tiny_finetune(tfds_dir, tmp_path / "missing"), tmp_path / "y")
  # Linear probing accepted it: labels 5..9 one-hot encoded to zeros (trained
  # towards no class, counted wrong); fine-tuning failed at the first batch.
  for mode in ("linprobe", "finetune"):
    c = tiny_finetune(tfds_dir, pretrain_workdir)
    c.update(num_classes=5, mode=mode)
    with pytest.raises(ValueError, match="num_classes=5 is fewer than the 10 classes of embedded"):
      finetune.run(c, tmp_path / mode)
    assert not (tmp_path / mode / "checkpoints").exists()


def _pipeline(workdir, tfds_dir):
  overrides = [
    f"--config.{k}={v}" for k, v in tiny_pipeline_overrides(tfds_dir, distill_steps=40).items()
  ]
  cmd = [
    sys.executable,
    str(REPO / "launch" / "pipeline.py"),
    "--config",
    str(REPO / "configs" / "pipeline.py") + ":quickstart",
    "--workdir",
    str(workdir),
    *overrides,
  ]
  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  log = open(str(workdir) + ".log", "a")
  proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log.name
  return proc


def test_pipeline_killed_in_stage_2_resumes(tfds_dir, tmp_path):
  workdir = tmp_path / "pipe"
  proc = _pipeline(workdir, tfds_dir)
  ckpt = workdir / "distill" / "checkpoints"
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, pathlib.Path(proc.log_path).read_text()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (workdir / "pretrain" / "stage_done.json").is_file()
  assert not (workdir / "distill" / "stage_done.json").exists()
  pre_lines = (workdir / "pretrain" / "metrics.jsonl").read_text()
  killed_at = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())

  proc = _pipeline(workdir, tfds_dir)
  assert proc.wait(timeout=600) == 0, pathlib.Path(proc.log_path).read_text()[-3000:]
  log = pathlib.Path(proc.log_path).read_text()
  assert "pretrain already finished" in log
  assert f"resumed distill from step {killed_at}" in log
  assert (workdir / "pretrain" / "metrics.jsonl").read_text() == pre_lines
  distill_steps = [
    json.loads(l)["step"] for l in (workdir / "distill" / "metrics.jsonl").read_text().splitlines()
  ]
  assert distill_steps[-1] == 40
  summary = json.loads((workdir / "summary.json").read_text())
  names = [s["name"] for s in summary["stages"]]
  assert names == ["pretrain", "distill", "finetune"]
  parents = [((s.get("lineage") or {}).get("parent") or {}) for s in summary["stages"]]
  assert parents[1]["path"] == str(workdir / "pretrain" / "checkpoints" / "4")
  assert parents[2]["path"] == str(workdir / "distill" / "checkpoints" / "40")
  assert summary["stages"][2]["top1"] is not None


def test_linear_probe_trains_only_the_head(pretrain_workdir, tfds_dir, tmp_path):
  c = finetune_configs.get_config("quickstart,linprobe")
  c.model.update(**TINY)
  c.init.source = str(pretrain_workdir)
  c.data.update(data_dir=str(tfds_dir))
  c.update(
    batch_size=16,
    eval_batch_size=200,
    total_steps=3,
    log_every=1,
    checkpoint_every=3,
    async_checkpoints=False,
  )
  summary = finetune.run(c, tmp_path)
  assert 0.0 <= summary["top1"] <= 1.0
  pre, _ = restore_subtree(str(pretrain_workdir), ("params", "encoder", "blocks_0"))
  after, _ = restore_subtree(str(tmp_path), ("params", "encoder", "blocks_0"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, pre, after)  # frozen
  stats, _ = restore_subtree(str(tmp_path), ("model_state", "batch_stats"))
  assert np.any(np.asarray(stats["bn"]["mean"]) != 0)  # BN statistics updated
