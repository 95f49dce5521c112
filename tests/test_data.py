"""Tests of mimdistill.data: datasets, augmentations, the grain pipeline."""

import functools
import hashlib
import io
import json
import os
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from conftest import data_config, take
from PIL import Image

from mimdistill.data import class_folder, embedded_shapes, input_pipeline, sources, transforms

make_config = functools.partial(data_config, augment="mae")


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def row_hashes(images):
  return sorted(hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images)


# ---------------------------------------------------------------------------
# The embedded dataset
# ---------------------------------------------------------------------------
def test_embedded_generation_is_deterministic_and_balanced():
  first = [
    (label, embedded_shapes.encode_png(image))
    for _, label, image in embedded_shapes.generate("test", 40)
  ]
  again = [
    (label, embedded_shapes.encode_png(image))
    for _, label, image in embedded_shapes.generate("test", 40)
  ]
  assert first == again
  other_seed = [
    embedded_shapes.encode_png(image)
    for _, _, image in embedded_shapes.generate("test", 40, seed=1)
  ]
  assert [png for _, png in first] != other_seed
  labels = [label for label, _ in first]
  assert np.bincount(labels).tolist() == [4] * 10
  assert len({png for _, png in first}) == 40  # No duplicate images.


def test_embedded_prepared_dataset(data_dir):
  builder = sources.get_builder("embedded", data_dir)
  assert builder.is_prepared()
  assert builder.info.file_format.value == "array_record"
  train = sources.open_split(builder, "train")
  test = sources.open_split(builder, "test")
  assert (len(train), len(test)) == (5000, 1000)
  # The stored bytes are exactly the regenerated PNG of the same index.
  record = train[123]
  index = int(record["id"].decode().split("_")[1])
  _, label, image = list(embedded_shapes.generate("train", index + 1))[-1]
  assert record["label"] == label
  assert record["image"] == embedded_shapes.encode_png(image)
  labels = [test[i]["label"] for i in range(len(test))]
  assert np.bincount(labels).tolist() == [100] * 10


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------
def test_random_resized_crop_params_stay_inside_and_follow_the_law():
  rng = np.random.default_rng(0)
  width, height = 300, 300  # Square: the aspect law stays symmetric.
  areas, log_ratios = [], []
  for _ in range(2000):
    top, left, h, w = transforms.random_resized_crop_params(rng, width, height, scale=(0.2, 1.0))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    areas.append(h * w / (width * height))
    log_ratios.append(np.log(w / h))
  areas, log_ratios = np.array(areas), np.array(log_ratios)
  # Area fractions lie in the scale range (up to rounding of w and h) and
  # aspect ratios in [3/4, 4/3]; accepted draws are biased to small crops.
  assert areas.min() >= 0.19 and areas.max() <= 1.0
  assert np.abs(log_ratios).max() <= np.log(4 / 3) + 0.02
  assert 0.45 < areas.mean() < 0.62
  assert abs(log_ratios.mean()) < 0.02


@pytest.mark.parametrize(
  "width,height,expected",
  [
    (100, 20, (0, 36, 20, 27)),  # Too wide: h = height, w = round(h * 4/3).
    (20, 100, (36, 0, 27, 20)),  # Too tall: w = width, h = round(w * 4/3).
    (50, 45, (0, 0, 45, 50)),  # Ratio in range: the whole image.
  ],
)
def test_random_resized_crop_falls_back_to_a_center_crop(width, height, expected):
  # A scale above 1 can never fit: all ten attempts fail.
  params = transforms.random_resized_crop_params(
    np.random.default_rng(0), width, height, scale=(2.0, 3.0)
  )
  assert params == expected


def test_random_resized_crop_output():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
  out = transforms.random_resized_crop(image, np.random.default_rng(1), 24)
  assert out.size == (24, 24)
  # The crop + bicubic resize equals PIL's crop followed by resize.
  top, left, h, w = transforms.random_resized_crop_params(np.random.default_rng(1), 53, 37)
  expected = image.crop((left, top, left + w, top + h)).resize((24, 24), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_normalisation_matches_to_tensor_and_normalize():
  pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)
  out = transforms.to_normalized_array(Image.fromarray(pixels))
  expected = (
    np.array([0, 128, 255], np.float32) / 255 - np.array([0.485, 0.456, 0.406], np.float32)
  ) / np.array([0.229, 0.224, 0.225], np.float32)
  assert out.dtype == np.float32 and out.shape == (1, 1, 3)
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(transforms.denormalize(out)[0, 0] * 255, [0, 128, 255], atol=1e-3)


def test_normalising_uint8_on_the_device_is_the_host_normalisation_bit_for_bit():
  import jax

  pixels = np.random.default_rng(3).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
  host = np.stack([transforms.to_normalized_array(Image.fromarray(p)) for p in pixels])
  device = np.asarray(jax.jit(transforms.normalize)(pixels))
  assert device.dtype == np.float32 and np.array_equal(device, host)
  every = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 256, 3)
  np.testing.assert_array_equal(
    np.asarray(transforms.normalize(every)), transforms.to_normalized_array(Image.fromarray(every))
  )
  floats = host.copy()
  assert transforms.normalize(floats) is floats  # already normalised: unchanged


def test_eval_transform_resizes_shorter_side_then_center_crops():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
  out = transforms.Eval(32)(image)["image"]
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  # int(32 / 0.875) = 36: 64x48 -> 48x36, then a centred 32x32 window.
  resized = image.resize((48, 36), Image.Resampling.BICUBIC)
  crop = resized.crop((8, 2, 40, 34))
  np.testing.assert_array_equal(out, np.asarray(crop))
  np.testing.assert_array_equal(transforms.normalize(out), transforms.to_normalized_array(crop))


def test_color_jitter_disabled_is_identity_and_enabled_changes_colours():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
  same = transforms.color_jitter(image, np.random.default_rng(0))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(image))
  changed = transforms.color_jitter(image, np.random.default_rng(0), 0.4, 0.4, 0.4)
  assert not np.array_equal(np.asarray(changed), np.asarray(image))


def test_distill_views_share_the_crop_and_only_the_student_is_jittered():
  image = Image.fromarray(np.random.default_rng(0).integers(30, 200, (40, 40, 3), dtype=np.uint8))
  # Without jitter, both views are the same crop, and it is MAE's crop.
  views = transforms.DistillTrain(32, jitter=(0, 0, 0))(image, np.random.default_rng(7))
  np.testing.assert_array_equal(views["image"], views["image_student"])
  mae = transforms.MaeTrain(32)(image, np.random.default_rng(7))
  np.testing.assert_array_equal(views["image"], mae["image"])
  # With brightness jitter only, the student is the teacher's crop scaled by
  # one factor (PIL Brightness blends with black: pixel * factor, rounded).
  views = transforms.DistillTrain(32, jitter=(0.4, 0, 0))(image, np.random.default_rng(7))
  np.testing.assert_array_equal(views["image"], mae["image"])
  teacher = views["image"].astype(np.float64)
  student = views["image_student"].astype(np.float64)
  unclipped = (teacher > 20) & (student < 250)
  factor = np.median(student[unclipped] / teacher[unclipped])
  assert factor != pytest.approx(1.0, abs=1e-3)
  assert 0.6 <= factor <= 1.4
  np.testing.assert_allclose(student[unclipped], teacher[unclipped] * factor, atol=1.0)


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------
def test_train_batches_have_the_documented_layout(data_dir):
  pipeline = input_pipeline.make_dataset(
    make_config(data_dir, augment="distill"), split="train", train=True
  )
  assert pipeline.num_examples == 5000
  assert pipeline.num_classes == 10
  assert pipeline.steps_per_epoch == 5000 // 16
  (batch,) = take(pipeline, 1)
  assert sorted(batch) == ["image", "image_student", "label"]
  assert batch["image"].shape == batch["image_student"].shape == (16, 32, 32, 3)
  assert batch["image"].dtype == batch["image_student"].dtype == np.uint8  # normalised on device
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  config = make_config(data_dir)
  a = take(input_pipeline.make_dataset(config, split="train", train=True), 3)
  b = take(input_pipeline.make_dataset(config, split="train", train=True), 3)
  assert_batches_equal(a, b)
  c = take(input_pipeline.make_dataset(config, split="train", train=True, seed=1), 3)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_epochs_are_reshuffled(data_dir):
  config = make_config(data_dir, augment="eval", batch_size=1000)
  epoch1, epoch2 = take(input_pipeline.make_dataset(config, split="test", train=True), 2)
  # Same images in a different order.
  assert row_hashes(epoch1["image"]) == row_hashes(epoch2["image"])
  assert not np.array_equal(epoch1["label"], epoch2["label"])


def test_resume_from_saved_state_continues_the_stream(data_dir):
  pipeline = input_pipeline.make_dataset(make_config(data_dir), split="train", train=True)
  it = iter(pipeline)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # Survives serialisation.
  expected = [next(it) for _ in range(3)]
  it.close()
  resumed = iter(pipeline)
  resumed.set_state(state)
  assert_batches_equal([next(resumed) for _ in range(3)], expected)
  resumed.close()


def test_resume_through_an_orbax_checkpoint(data_dir, tmp_path):
  pipeline = input_pipeline.make_dataset(make_config(data_dir), split="train", train=True)
  it = iter(pipeline)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(
      1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it.grain_iterator))
    )
    manager.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    it.close()
    resumed = iter(pipeline)
    manager.restore(
      1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed.grain_iterator))
    )
  assert_batches_equal([next(resumed) for _ in range(2)], expected)
  resumed.close()


def test_eval_padding_and_mask_count_every_example_once(data_dir):
  config = make_config(data_dir, augment="eval", batch_size=48)
  pipeline = input_pipeline.make_dataset(config, split="test", train=False)
  batches = list(pipeline)
  assert len(batches) == pipeline.steps_per_epoch == 21  # ceil(1000 / 48)
  assert all(b["image"].shape[0] == 48 for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == 1000
  assert mask[:1000].all() and not mask[1000:].any()  # Padding is last.
  labels = np.concatenate([b["label"] for b in batches])[mask == 1]
  assert np.bincount(labels).tolist() == [100] * 10
  images = np.concatenate([b["image"] for b in batches])[mask == 1]
  assert len(set(row_hashes(images))) == 1000

  # Two hosts: equal batch counts, and the real examples are the same ones.
  hosts = [
    list(
      input_pipeline.make_dataset(
        config, split="test", train=False, process_index=i, process_count=2
      )
    )
    for i in range(2)
  ]
  assert [len(h) for h in hosts] == [21, 21]
  assert all(b["image"].shape[0] == 24 for h in hosts for b in h)
  host_images = np.concatenate([b["image"][b["mask"] == 1] for h in hosts for b in h])
  assert row_hashes(host_images) == row_hashes(images)


def test_hosts_get_disjoint_shares_of_the_same_global_batches(data_dir):
  config = make_config(data_dir)
  single = take(input_pipeline.make_dataset(config, split="train", train=True), 2)
  hosts = [
    take(
      input_pipeline.make_dataset(
        config, split="train", train=True, process_index=i, process_count=2
      ),
      2,
    )
    for i in range(2)
  ]
  for step in range(2):
    host0, host1 = hosts[0][step]["image"], hosts[1][step]["image"]
    assert host0.shape[0] == host1.shape[0] == 8
    assert not set(row_hashes(host0)) & set(row_hashes(host1))
    # Together they are exactly the single-host global batch (augmentation
    # included: its randomness follows the global stream position).
    assert row_hashes(np.concatenate([host0, host1])) == row_hashes(single[step]["image"])


def test_worker_processes_give_the_same_batches(data_dir):
  config = make_config(data_dir, augment="distill")
  in_process = take(input_pipeline.make_dataset(config, split="train", train=True), 3)
  config.num_workers = 2
  with_workers = take(input_pipeline.make_dataset(config, split="train", train=True), 3)
  assert_batches_equal(in_process, with_workers)


def test_finite_epochs_end_after_whole_global_batches(data_dir):
  config = make_config(data_dir, augment="eval", batch_size=48, num_epochs=2)
  batches = list(input_pipeline.make_dataset(config, split="test", train=True))
  assert len(batches) == 2000 // 48


def test_pipeline_never_imports_tensorflow(data_dir):
  for augment, train in (("mae", True), ("distill", True), ("eval", False)):
    take(
      input_pipeline.make_dataset(
        make_config(data_dir, augment=augment), split="test", train=train
      ),
      2,
    )
  assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------
# Validation and error messages
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"name": "no_such_dataset_xyz"}, "'no_such_dataset_xyz'"),
    ({"name": "folder:/no/such/folder"}, "/no/such/folder"),
    ({"augment": "randaug"}, "'randaug'"),
    ({"batch_size": 15}, "batch_size=15"),
    ({"image_size": 0}, "image_size=0"),
    ({"num_workers": -1}, "num_workers=-1"),
  ],
)
def test_bad_configs_fail_with_the_value_named(tmp_path, overrides, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    input_pipeline.make_dataset(
      make_config(str(tmp_path), **overrides),
      split="train",
      train=True,
      process_count=2,
      process_index=0,
    )
  assert not os.listdir(tmp_path)  # Failed before preparing anything.


def test_missing_config_field_is_named(tmp_path):
  config = make_config(str(tmp_path)).to_dict()  # Plain dicts work too.
  del config["image_size"]
  with pytest.raises(ValueError, match="image_size"):
    input_pipeline.make_dataset(config, split="train", train=True)


def test_unknown_split_lists_the_splits(data_dir):
  with pytest.raises(ValueError, match="'validation'.*test.*train"):
    input_pipeline.make_dataset(make_config(data_dir), split="validation", train=False)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build mnist .*--file_format=array_record"):
    input_pipeline.make_dataset(make_config(str(tmp_path), name="mnist"), split="train", train=True)


class CatalogLike(tfds.core.GeneratorBasedBuilder):
  """A tiny catalog-like dataset (not one of mimdistill's own builders)."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None  # See local_builder.LocalBuilder.code_path.

  def _info(self):
    features = tfds.features.FeaturesDict(
      {
        "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(num_classes=2),
      }
    )
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(4):
      png = embedded_shapes.encode_png(np.full((8, 8, 3), i, np.uint8))
      yield i, {"image": png, "label": i % 2}


def test_catalog_dataset_in_array_record_is_read_and_tfrecord_is_refused(tmp_path):
  builder = CatalogLike(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  config = make_config(
    str(tmp_path), name="catalog_like", augment="eval", image_size=8, batch_size=8
  )
  (batch,) = list(input_pipeline.make_dataset(config, split="train", train=False))
  assert batch["image"].shape == (8, 8, 8, 3)
  assert batch["mask"].tolist() == [1] * 4 + [0] * 4

  # Pretend it had been prepared as TFRecord only.
  info_path = os.path.join(builder.data_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(
    ValueError, match="tfds convert_format --dataset_version_dir=.*--out_file_format=array_record"
  ):
    input_pipeline.make_dataset(config, split="train", train=False)


# ---------------------------------------------------------------------------
# Class folders
# ---------------------------------------------------------------------------
def write_image(path, value, fmt, mode="RGB"):
  array = np.full((10, 12, 3), value, np.uint8)
  image = Image.fromarray(array).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
  root = tmp_path / "pets"
  files = {}
  for split, count in (("train", 3), ("val", 2)):
    for c, name in enumerate(("dog", "cat", "bird")):  # Not sorted on disk.
      for i in range(count):
        ext, fmt = ("png", "PNG") if i == 0 else ("jpg", "JPEG")
        rel = f"{split}/{name}/{i}.{ext}"
        mode = "L" if i == 1 else "RGB"  # Grayscale files exist in the wild.
        files[rel] = write_image(root / rel, 40 * c + i, fmt, mode)
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  return root, files


def test_class_folder_builder_stores_bytes_labels_and_ids(image_folder, tmp_path):
  root, files = image_folder
  builder = sources.get_builder(f"folder:{root}", str(tmp_path / "tfds"))
  sources.ensure_prepared(builder)
  assert sources.class_names(builder) == ("bird", "cat", "dog")
  assert sorted(builder.info.splits) == ["train", "val"]
  train = sources.open_split(builder, "train")
  assert len(train) == 9
  for record in train:
    rel = record["id"].decode()
    assert record["image"] == files[rel]  # Stored as-is, not re-encoded.
    assert record["label"] == ["bird", "cat", "dog"].index(rel.split("/")[1])


def test_class_folder_configs_do_not_collide(tmp_path):
  a = class_folder.config_for(tmp_path / "x" / "data")
  b = class_folder.config_for(tmp_path / "y" / "data")
  assert a.name != b.name and a.name.startswith("data-")
  same = class_folder.config_for(tmp_path / "x" / ".." / "x" / "data")
  assert same.name == a.name


def test_class_folder_pipeline(image_folder, tmp_path):
  root, _ = image_folder
  config = make_config(str(tmp_path / "tfds"), name=f"folder:{root}", augment="eval", batch_size=8)
  pipeline = input_pipeline.make_dataset(config, split="val", train=False)
  assert pipeline.class_names == ("bird", "cat", "dog")
  batches = list(pipeline)
  assert len(batches) == 1
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask == 1]
  assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
  config.augment = "mae"
  (batch,) = take(input_pipeline.make_dataset(config, split="train", train=True), 1)
  assert batch["image"].shape == (8, 32, 32, 3)


def test_class_folder_without_splits_says_the_layout(tmp_path):
  write_image(tmp_path / "flat" / "cat.jpg", 0, "JPEG")
  with pytest.raises(ValueError, match="<split>/<class>"):
    sources.get_builder(f"folder:{tmp_path / 'flat'}", str(tmp_path))


def test_cifar10_class_folder(cifar10_folder):
  config = make_config(None, name=cifar10_folder, augment="eval", batch_size=400)
  pipeline = input_pipeline.make_dataset(config, split="test", train=False)
  assert pipeline.num_examples == 10000 and pipeline.num_classes == 10
  assert pipeline.class_names[0] == "airplane"
  (batch,) = take(pipeline, 1)
  assert batch["image"].shape == (400, 32, 32, 3) and batch["mask"].all()
  builder = sources.get_builder(cifar10_folder, None)
  assert len(sources.open_split(builder, "train")) == 50000
