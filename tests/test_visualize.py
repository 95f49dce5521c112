"""The plotting functions on synthetic arrays, and the PNGs the stages write
(relation maps after stage 2, learning curves and confusion matrix after
stage 3) after a tiny pipeline run."""

import json
import pathlib
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from mimdistill.visualize import confusion, curves
from mimdistill.visualize import relation_maps as rm

sys.path.insert(0, str(REPO))
from configs import pipeline as pipeline_configs  # noqa: E402

NAMES = (
  "circle",
  "square",
  "triangle",
  "cross",
  "ring",
  "stripes",
  "checkerboard",
  "gradient",
  "dots",
  "star",
)


def png_size(path):
  path = pathlib.Path(path)  # the plotters return an etils.epath.Path
  assert path.is_file() and path.stat().st_size > 5000, path
  with Image.open(path) as img:
    assert img.format == "PNG"
    return img.size


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# -----------------------------------------------------------------------------
# Relation maps
# -----------------------------------------------------------------------------
def test_qk_attention_and_query_maps():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 2, 2, 17, 8)).astype(np.float32)
  att = rm.qk_attention(q, k)
  assert att.shape == (2, 17, 17)
  want = softmax(np.einsum("brqd,brkd->brqk", q, k) / np.sqrt(8)).mean(1)
  np.testing.assert_allclose(att, want, rtol=1e-5, atol=1e-6)

  assert rm.token_index("cls", 4) == 0
  assert rm.token_index((1, 2), 4) == 1 + 1 * 4 + 2
  assert rm.token_label(7, 4) == "patch (1,2)"
  maps = rm.query_maps(att, ["cls", (1, 2)], 4)
  assert maps.shape == (2, 2, 4, 4)
  np.testing.assert_array_equal(maps[:, 1].reshape(2, 16), att[:, 7, 1:])
  with pytest.raises(ValueError, match="outside the 4x4 grid"):
    rm.token_index((4, 0), 4)
  with pytest.raises(ValueError, match="grid plus CLS"):
    rm.query_maps(att, ["cls"], 3)
  assert rm.default_queries(8) == ("cls", (4, 4), (2, 2), (6, 2))
  # KL([.5, .5] || [.9, .1]) = .5 ln(.5/.9) + .5 ln(.5/.1)
  np.testing.assert_allclose(
    rm.row_kl(np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])),
    [0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(5.0)],
    rtol=1e-12,
  )


def test_plot_relation_maps(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  t = softmax(rng.normal(size=(3, 65, 65)))
  s = softmax(rng.normal(size=(3, 65, 65)))
  path = rm.plot_relation_maps(images, t, s, tmp_path / "sub" / "rel.png")
  assert path == tmp_path / "sub" / "rel.png"
  w, h = png_size(path)
  # 3 rows, 1 image + 4 queries x (teacher, student) columns: wide.
  assert 700 < w < 1600 and 300 < h < 700 and w > 1.8 * h
  with pytest.raises(ValueError, match="differ"):
    rm.plot_relation_maps(images, t, s[:, :17, :17], tmp_path / "x.png")


# -----------------------------------------------------------------------------
# Learning curves
# -----------------------------------------------------------------------------
def write_metrics(workdir, steps=30, eval_every=10, resume_at=None):
  workdir.mkdir(parents=True, exist_ok=True)
  lines = []
  for s in range(1, steps + 1):
    lines.append(dict(step=s, prefix="train", loss=2.0 / s, lr=1e-3 * min(1, s / 5)))
    if s % eval_every == 0:
      lines.append(
        dict(
          step=s,
          prefix="eval",
          loss=1.0 / s,
          top1=s / steps,
          top5=min(1.0, 2 * s / steps),
          count=100,
        )
      )
  if resume_at:  # a resumed run logs the steps after its checkpoint again
    lines += [dict(step=s, prefix="train", loss=-1.0, lr=0.0) for s in range(resume_at, steps + 1)]
  text = "\n".join(json.dumps(l) for l in lines) + '\n{"step": 9, "pre'
  (workdir / "metrics.jsonl").write_text(text)
  return workdir


def test_read_metrics_keeps_the_last_record_per_step(tmp_path):
  m = curves.read_metrics(write_metrics(tmp_path / "w", resume_at=21))
  assert set(m) == {"train", "eval"}
  np.testing.assert_array_equal(m["train"]["step"], np.arange(1, 31))
  assert m["train"]["loss"][19] == pytest.approx(0.1)
  assert (m["train"]["loss"][20:] == -1.0).all()
  np.testing.assert_array_equal(m["eval"]["step"], [10, 20, 30])
  np.testing.assert_allclose(m["eval"]["top1"], [1 / 3, 2 / 3, 1.0])
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    curves.read_metrics(tmp_path / "missing")


def test_plot_learning_curves(tmp_path):
  a = write_metrics(tmp_path / "a")
  w, h = png_size(curves.plot_learning_curves(a, tmp_path / "one.png"))
  assert 1000 < w < 1800 and 250 < h < 600
  # Several workdirs (one without eval, e.g. pre-training) in one figure.
  b = tmp_path / "b"
  b.mkdir()
  (b / "metrics.jsonl").write_text(
    "".join(json.dumps(dict(step=s, prefix="train", loss=1.0, lr=1e-4)) + "\n" for s in range(1, 5))
  )
  png_size(curves.plot_learning_curves({"distill": b, "finetune": a}, tmp_path / "two.png"))


# -----------------------------------------------------------------------------
# Confusion matrix
# -----------------------------------------------------------------------------
def test_confusion_from_predictions_respects_the_mask():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(40, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=40).astype(np.int32)
  mask = (np.arange(40) < 37).astype(np.float32)  # 3 padded examples
  want = np.zeros((10, 10), np.int64)
  np.add.at(want, (labels[:37], logits[:37].argmax(1)), 1)
  got = confusion.confusion_from_predictions(labels, logits.argmax(1), 10, mask)
  np.testing.assert_array_equal(got, want)


def test_plot_confusion_matrix(tmp_path):
  counts = np.diag(np.full(10, 80)) + np.random.default_rng(3).integers(0, 5, (10, 10))
  w, h = png_size(confusion.plot_confusion_matrix(counts, NAMES, tmp_path / "c.png"))
  assert 500 < w < 1200 and 450 < h < 1100
  # A head wider than the dataset's names (num_classes=12): numbered classes.
  png_size(confusion.plot_confusion_matrix(np.eye(12, dtype=int), NAMES[:10], tmp_path / "c12.png"))
  with pytest.raises(ValueError, match="square"):
    confusion.plot_confusion_matrix(np.zeros((2, 3)), None, tmp_path / "bad.png")


# -----------------------------------------------------------------------------
# The stages write their PNGs
# -----------------------------------------------------------------------------
def tiny_pipeline(tfds_dir):
  c = pipeline_configs.get_config("quickstart")
  c.stages = "pretrain,distill,finetune"  # segmentation's picture: test_segmentation_stage
  for name in ("pretrain", "distill", "finetune"):
    s = c[name]
    s.data.data_dir = str(tfds_dir)
    s.mesh.num_devices = 1
    s.update(batch_size=16, total_steps=2, log_every=1, checkpoint_every=2, async_checkpoints=False)
  arch = dict(width=32, depth=1, num_heads=2, patch_size=8)
  c.pretrain.model.update(**arch)
  c.pretrain.model.decoder.update(width=32, depth=1, num_heads=2)
  c.pretrain.num_visualize = 2
  c.distill.teacher.update(**arch)
  c.distill.student.update(**arch)
  c.distill.num_visualize = 2
  c.finetune.model.update(**arch)
  c.finetune.eval_batch_size = 200
  return c


def test_stages_write_their_pngs(tfds_dir, tmp_path):
  from mimdistill.stages.pipeline import run_pipeline

  run_pipeline(tiny_pipeline(tfds_dir), tmp_path)
  w, h = png_size(tmp_path / "distill" / "relation_maps.png")
  assert w > 1.8 * h and h > 200  # 2 images x (image + 4 queries x 2 maps)
  w, h = png_size(tmp_path / "finetune" / "learning_curves.png")
  assert w > 2.5 * h
  w, h = png_size(tmp_path / "finetune" / "confusion_matrix.png")
  assert 0.8 < w / h < 1.6
  assert (tmp_path / "pretrain" / "reconstructions.png").is_file()
