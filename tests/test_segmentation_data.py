"""Segmentation data: folder builders on tiny folders (incl. the error
cases), the embedded scenes, mmseg's ADE20K transforms, label checks."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from mimdistill.data import cv2_ops, embedded_segmentation, embedded_shapes
from mimdistill.data import segmentation_folders as folders
from mimdistill.data import segmentation_transforms as st
from mimdistill.data.segmentation_labels import check_labels, decode_annotation
from mimdistill.data.sources import decode_image

# sha256 over the first 40 images (+ labels) of each split, as generated
# before the generator learned to return masks: the classification
# dataset must not change.
SHAPES_DIGEST = "a36747a2af69b2a7c12f5c40c623d35ac72d7824dc9c70a1c7105cc600c9032d"


def test_classification_shapes_are_unchanged():
  h = hashlib.sha256()
  for split in ("train", "test"):
    for _, label, image in embedded_shapes.generate(split, 40):
      h.update(image.tobytes())
      h.update(bytes([label]))
  assert h.hexdigest() == SHAPES_DIGEST


def test_render_returns_the_mask_it_draws():
  rng = lambda: np.random.default_rng(np.random.SeedSequence([1, 2, 3]))
  image, mask = embedded_shapes.render(0, rng(), return_mask=True)
  np.testing.assert_array_equal(image, embedded_shapes.render(0, rng()))
  assert mask.dtype == bool and 0 < mask.mean() < 1


def test_embedded_scenes_are_deterministic_and_labelled():
  a = list(embedded_segmentation.generate("train", 4))
  b = list(embedded_segmentation.generate("train", 4))
  for (_, ia, ca), (_, ib, cb) in zip(a, b, strict=True):
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ca, cb)
    assert ia.shape == (64, 64, 3) and ca.shape == (64, 64)
    assert ca.max() < embedded_segmentation.NUM_CLASSES
    assert len(np.unique(ca)) >= 2


def test_embedded_builder_prepares(tmp_path, monkeypatch):
  monkeypatch.setattr(embedded_segmentation, "SPLIT_SIZES", {"train": 6, "test": 3})
  builder = embedded_segmentation.SegShapesBuilder(
    data_dir=str(tmp_path), file_format="array_record"
  )
  builder.prepare()
  source = builder.as_data_source(split="test")
  assert len(source) == 3
  record = source[0]
  assert decode_annotation(record["annotation"]).shape == (64, 64)


def _png(array, mode=None):
  buffer = io.BytesIO()
  Image.fromarray(array, mode=mode).save(buffer, format="PNG")
  return buffer.getvalue()


def _make_ade(root, splits=(("training", 3), ("validation", 2)), mask_dir="annotations"):
  rng = np.random.default_rng(0)
  for split, n in splits:
    (root / "images" / split).mkdir(parents=True)
    (root / mask_dir / split).mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
        root / "images" / split / f"ADE_{split}_{i:04d}.jpg"
      )
      (root / mask_dir / split / f"ADE_{split}_{i:04d}.png").write_bytes(
        _png(rng.integers(0, 5, (20, 30)).astype(np.uint8))
      )


def test_ade_layout_builder(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  _make_ade(root)
  # The folder that holds ADEChallengeData2016 is recognised too.
  assert folders.find_layout(tmp_path) == folders.find_layout(root)
  builder = folders.SegFolderBuilder(
    config=folders.config_for(root), data_dir=str(tmp_path / "tfds"), file_format="array_record"
  )
  builder.prepare()
  train = builder.as_data_source(split="training")
  assert len(train) == 3 and len(builder.as_data_source(split="validation")) == 2
  record = train[0]
  assert np.asarray(decode_image(record["image"])).shape == (20, 30, 3)
  assert decode_annotation(record["annotation"]).shape == (20, 30)


def test_image_mask_pair_layout(tmp_path):
  _make_ade(tmp_path / "data", splits=(("train", 2),), mask_dir="masks")
  pairs = folders.find_layout(tmp_path / "data")
  assert list(pairs) == ["train"] and pairs["train"][1].endswith("masks/train")
  explicit = folders.config_for_pairs({"train": pairs["train"]})
  assert explicit.name.startswith("pairs-")


def test_unpaired_files_are_named(tmp_path):
  root = tmp_path / "ade"
  _make_ade(root, splits=(("training", 2),))
  (root / "annotations" / "training" / "ADE_training_0001.png").unlink()
  (root / "annotations" / "training" / "stray.png").write_bytes(_png(np.zeros((2, 2), np.uint8)))
  with pytest.raises(ValueError, match="ADE_training_0001.jpg.*stray.png"):
    folders.SegFolderBuilder(config=folders.config_for(root), data_dir=str(tmp_path / "tfds"))


def test_unrecognised_layout_shows_the_expected_one(tmp_path):
  (tmp_path / "pictures").mkdir()
  with pytest.raises(ValueError, match="images/training"):
    folders.find_layout(tmp_path)


def test_label_values_beyond_num_classes_are_refused():
  check_labels(np.array([[0, 3, 255]]), 4)
  with pytest.raises(ValueError, match=r"\[7\].*num_classes=4"):
    check_labels(np.array([[0, 7, 255]]), 4)
  aug = st.SegmentationAugment(num_classes=4, crop_size=(16, 16), img_scale=(40, 16))
  with pytest.raises(ValueError, match="num_classes"):
    aug.train(
      np.zeros((20, 30, 3), np.uint8), np.full((20, 30), 9, np.uint8), np.random.default_rng(0)
    )


def test_reduce_zero_label_when_loading():
  aug = st.SegmentationAugment(num_classes=150, reduce_zero_label=True)
  np.testing.assert_array_equal(aug.load_label(np.array([[0, 1, 150]], np.uint8)), [[255, 0, 149]])


def test_train_transform_shapes_padding_and_determinism():
  rng_image = np.random.default_rng(1)
  image = rng_image.integers(0, 255, (24, 40, 3), dtype=np.uint8)
  label = rng_image.integers(0, 3, (24, 40)).astype(np.uint8)
  aug = st.SegmentationAugment(num_classes=3, crop_size=(32, 32), img_scale=(64, 16))
  a = aug.train(image, label, np.random.default_rng(5))
  b = aug.train(image, label, np.random.default_rng(5))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.float32
  assert a["label"].shape == (32, 32) and a["label"].dtype == np.int32
  # Scaled to short side <= 32 (ratio <= 2): the crop is padded with 0 / 255.
  rows = np.where((a["label"] != 255).any(axis=1))[0]
  assert rows.max() < 32
  if rows.max() < 31:
    assert (a["image"][rows.max() + 1 :] == 0).all()
  assert set(np.unique(a["label"])) <= {0, 1, 2, 255}


def test_rescale_size_as_mmcv():
  # mmcv rescale_size: factor min(2048 / long, 512 / short), int(x * f + 0.5).
  assert st.rescale_size(375, 500, (2048, 512)) == (512, 683)
  assert st.rescale_size(1000, 200, (2048, 512)) == (2048, 410)
  out = st.SegmentationAugment().eval(
    np.zeros((375, 500, 3), np.uint8), np.zeros((375, 500), np.uint8)
  )
  assert out["image"].shape == (512, 683, 3) and out["label"].shape == (375, 500)


def test_random_crop_respects_cat_max_ratio():
  label = np.zeros((64, 64), np.uint8)
  label[:, 48:] = 1  # only crops reaching the right quarter have 2 classes
  image = np.zeros((64, 64, 3), np.uint8)
  hits = 0
  for seed in range(20):
    _, crop = st.random_crop(image, label, (16, 16), np.random.default_rng(seed), 0.75)
    counts = np.bincount(crop.reshape(-1), minlength=2)
    hits += counts.min() > 0 and counts.max() / counts.sum() < 0.75
  assert hits >= 10  # re-drawn up to 10 times towards mixed crops


def test_photometric_distortion_is_seeded_uint8():
  image = np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8)
  a = st.photometric_distortion(image, np.random.default_rng(3))
  np.testing.assert_array_equal(a, st.photometric_distortion(image, np.random.default_rng(3)))
  assert a.dtype == np.uint8 and a.shape == image.shape


def test_cv2_semantics_without_antialias():
  # Halving averages 2x2 blocks (cv2's area path), never a wider filter.
  image = np.random.default_rng(4).integers(0, 255, (8, 8), dtype=np.uint8)
  blocks = image.reshape(4, 2, 4, 2).astype(int).sum(axis=(1, 3))
  np.testing.assert_array_equal(cv2_ops.resize_linear(image, (4, 4)), (blocks + 2) >> 2)
  # Nearest: floor(dst * in / out).
  np.testing.assert_array_equal(cv2_ops.resize_nearest(np.arange(6)[None], (4, 1))[0], [0, 1, 3, 4])
  hsv = cv2_ops.bgr_to_hsv(np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0]]], np.uint8))
  np.testing.assert_array_equal(hsv[0, :, 0], [0, 60, 120])
  np.testing.assert_array_equal(cv2_ops.hsv_to_bgr(hsv), [[[0, 0, 255], [0, 255, 0], [255, 0, 0]]])


def test_cv2_ops_match_opencv_when_installed():
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(5)
  for _ in range(5):
    image = rng.integers(
      0, 255, (int(rng.integers(5, 60)), int(rng.integers(5, 60)), 3), dtype=np.uint8
    )
    w, h = int(rng.integers(3, 90)), int(rng.integers(3, 90))
    np.testing.assert_array_equal(
      cv2_ops.resize_nearest(image, (w, h)),
      cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST),
    )
    diff = cv2_ops.resize_linear(image, (w, h)).astype(int) - cv2.resize(image, (w, h)).astype(int)
    assert np.abs(diff).max() <= 1
    np.testing.assert_array_equal(cv2_ops.bgr_to_hsv(image), cv2.cvtColor(image, cv2.COLOR_BGR2HSV))


def test_preprocess_for_the_input_pipeline():
  image = _png(np.random.default_rng(6).integers(0, 255, (20, 30, 3), dtype=np.uint8))
  ann = _png(np.ones((20, 30), np.uint8))
  aug = st.SegmentationAugment(num_classes=3, crop_size=(16, 16), img_scale=(40, 16))
  train = st.SegmentationPreprocess(aug, train=True, seed=1)
  example = train(7, {"image": image, "annotation": ann})
  np.testing.assert_array_equal(
    example["image"], train(7, {"image": image, "annotation": ann})["image"]
  )
  ev = st.SegmentationPreprocess(
    aug, train=False, eval_image_size=(16, 40), eval_label_size=(24, 32)
  )
  real = ev(0, {"image": image, "annotation": ann})
  pad = ev(1, {})
  assert real["image"].shape == pad["image"].shape == (16, 40, 3)
  assert real["label"].shape == pad["label"].shape == (24, 32)
  assert real["mask"] == 1 and pad["mask"] == 0 and (pad["label"] == 255).all()
  assert (real["label"][20:] == 255).all() and (real["label"][:20, :30] == 1).all()
  np.testing.assert_array_equal(real["ori_shape"], [20, 30])
