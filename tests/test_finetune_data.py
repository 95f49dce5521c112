"""Tests of the fine-tuning data: RandAugment, random erasing, mixup/cutmix,
and the 'finetune' / 'linprobe' pipelines (timm 0.3.2 / MAE semantics)."""

import functools
import math
import sys

import numpy as np
import pytest
from conftest import data_config, take
from PIL import Image

from mimdistill.data import finetune_transforms as ft
from mimdistill.data import input_pipeline, mixup, transforms

make_config = functools.partial(data_config, augment="finetune")


def random_image(seed=0, size=(32, 32)):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), np.uint8))


# ---------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------
def test_default_recipe_is_timms_rand_m9_mstd05_inc1():
  t = ft.FinetuneTrain(224)
  ra = t.rand_augment
  assert ra.num_layers == 2 and ra.choice_weights is None
  assert [op.name for op in ra.ops] == list(ft.RAND_INCREASING_TRANSFORMS)
  for op in ra.ops:
    assert (op.prob, op.magnitude, op.magnitude_std) == (0.5, 9, 0.5)
    # create_transform: the ImageNet mean as uint8; 'bicubic' is passed on.
    assert op.fill == (124, 116, 104)
    assert op.resample == Image.Resampling.BICUBIC
  assert op.hparams["translate_const"] == int(224 * 0.45)
  erase = t.random_erasing
  assert (erase.probability, erase.mode, erase.min_count, erase.max_count) == (0.25, "pixel", 1, 1)
  assert np.allclose(erase.log_aspect_ratio, (math.log(0.3), math.log(1 / 0.3)))
  assert (erase.min_area, erase.max_area) == (0.02, 1 / 3)
  assert ft.FinetuneTrain(32, auto_augment=None).rand_augment is None
  assert ft.FinetuneTrain(32, re_prob=0).random_erasing is None
  plain = ft.rand_augment_transform("rand-m7-n3-inc0", {})
  assert plain.num_layers == 3 and plain.ops[0].magnitude == 7
  assert [op.name for op in plain.ops] == list(ft.RAND_TRANSFORMS)
  # timm's default hparams: random bilinear/bicubic and grey fill.
  assert plain.ops[0].resample == ft._RANDOM_INTERPOLATION
  assert plain.ops[0].fill == (128, 128, 128)


@pytest.mark.parametrize("name", sorted(ft.OPS))
def test_every_op_runs_and_keeps_size_and_mode(name):
  image = random_image(1, (32, 24))
  rng = np.random.default_rng(0)
  for magnitude in (0, 5, 9, 10):
    op = ft.AugmentOp(
      name,
      prob=1.0,
      magnitude=magnitude,
      hparams=dict(translate_const=14, img_mean=(124, 116, 104), magnitude_std=0.5),
    )
    for _ in range(3):
      out = op(image, rng)
      assert out.size == image.size and out.mode == "RGB"


@pytest.mark.parametrize(
  "name, magnitude, expected",
  [
    # Signed ops: either sign, with probability 1/2.
    ("Rotate", 9, [-27.0, 27.0]),
    ("ShearX", 9, [-0.27, 0.27]),
    ("TranslateXRel", 10, [-0.45, 0.45]),
    ("ColorIncreasing", 9, [0.19, 1.81]),
    ("SharpnessIncreasing", 0, [1.0]),
    ("SolarizeIncreasing", 9, [256 - 230]),
    ("SolarizeIncreasing", 0, [256]),
    ("PosterizeIncreasing", 9, [1]),
    ("PosterizeIncreasing", 10, [0]),
    ("PosterizeIncreasing", 0, [4]),
    ("SolarizeAdd", 9, [99]),
    ("Posterize", 9, [3]),
    ("Color", 9, [1.72]),
  ],
)
def test_level_to_argument_matches_timm(name, magnitude, expected):
  op = ft.AugmentOp(name, magnitude=magnitude)
  values = {op.level_args(magnitude, np.random.default_rng(s))[0] for s in range(20)}
  assert sorted(values) == pytest.approx(expected)


def test_posterize_to_zero_bits_is_black_and_fill_colour_is_the_mean():
  image = random_image(2)
  black = ft.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(
    image, np.random.default_rng(0)
  )
  assert not np.asarray(black).any()
  # Translating by 45% of the width uncovers columns of the fill colour.
  op = ft.AugmentOp(
    "TranslateXRel",
    prob=1.0,
    magnitude=10,
    hparams=dict(img_mean=(124, 116, 104), interpolation=Image.Resampling.BICUBIC),
  )
  shifted = np.asarray(op(image, np.random.default_rng(0)))
  uncovered = np.all(shifted == (124, 116, 104), axis=-1).all(axis=0)
  assert uncovered.sum() >= int(0.45 * 32) - 1


def test_magnitude_is_gaussian_with_std_and_clipped_to_0_10():
  rng = np.random.default_rng(0)
  op = ft.AugmentOp("Rotate", magnitude=9, hparams=dict(magnitude_std=0.5))
  draws = np.array([op.sample_magnitude(rng) for _ in range(4000)])
  assert draws.min() >= 0 and draws.max() == 10.0  # N(9, .5) > 10: 2.3%.
  assert abs(np.median(draws) - 9) < 0.05
  assert 0.42 < draws.std() < 0.52  # Clipping narrows it slightly.
  assert 0.01 < np.mean(draws == 10.0) < 0.04
  wide = ft.AugmentOp("Rotate", magnitude=1, hparams=dict(magnitude_std=5))
  draws = np.array([wide.sample_magnitude(rng) for _ in range(1000)])
  assert draws.min() == 0.0 and draws.max() == 10.0
  fixed = ft.AugmentOp("Rotate", magnitude=9)
  assert {fixed.sample_magnitude(rng) for _ in range(10)} == {9.0}


def test_ops_fire_with_probability_half_and_two_are_chosen():
  rng = np.random.default_rng(0)
  image = random_image(3)
  op = ft.AugmentOp("Invert", prob=0.5)
  changed = np.mean([op(image, rng) is not image for _ in range(2000)])
  assert 0.45 < changed < 0.55
  calls = []

  class Spy:
    def __init__(self, i):
      self.i = i

    def __call__(self, img, rng):
      calls.append(self.i)
      return img

  ra = ft.RandAugment([Spy(i) for i in range(15)], num_layers=2)
  for _ in range(3000):
    ra(image, rng)
  counts = np.bincount(calls, minlength=15)
  assert len(calls) == 6000 and counts.min() > 300  # Uniform, replacement.


def test_bad_auto_augment_strings_fail_clearly():
  with pytest.raises(ValueError, match="only RandAugment"):
    ft.rand_augment_transform("original-mstd0.5")
  with pytest.raises(ValueError, match="bad section"):
    ft.rand_augment_transform("rand-x9")


# ---------------------------------------------------------------------------
# Random erasing
# ---------------------------------------------------------------------------
def test_random_erasing_probability_area_and_aspect():
  erase = ft.RandomErasing(0.25, mode="pixel", max_count=1)
  rng = np.random.default_rng(0)
  hits, areas, aspects = 0, [], []
  for _ in range(3000):
    array = np.zeros((32, 32, 3), np.float32)
    erase(array, rng)
    rows, cols = np.nonzero(np.any(array != 0, axis=-1))
    if rows.size == 0:
      continue
    hits += 1
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert rows.size == h * w  # One filled rectangle, strictly inside.
    assert h < 32 and w < 32
    areas.append(h * w / 1024)
    aspects.append(h / w)
  # Slightly under 0.25: a rectangle that does not fit in ten tries is
  # skipped (timm does the same).
  assert 0.21 < hits / 3000 < 0.28
  # Bounds up to the rounding of h and w to whole pixels.
  assert min(areas) >= 0.02 * 0.6 and max(areas) <= 1 / 3 * 1.25
  assert min(areas) < 0.04 and max(areas) > 0.28
  assert min(aspects) >= 0.3 * 0.6 and max(aspects) <= 1 / 0.3 / 0.6
  assert min(aspects) < 0.45 and max(aspects) > 2.2


def test_random_erasing_fill_modes():
  rng = np.random.default_rng(0)
  for mode in ("pixel", "rand", "const"):
    erase = ft.RandomErasing(1.0, mode=mode)
    array = np.full((32, 32, 3), 7.0, np.float32)
    erase(array, rng)
    region = array[np.any(array != 7.0, axis=-1)]
    assert region.size  # Something was erased.
    if mode == "pixel":
      assert len(np.unique(region)) == region.size
      assert abs(region.mean()) < 0.5 and 0.6 < region.std() < 1.4
    elif mode == "rand":
      assert len(np.unique(region, axis=0)) == 1  # One colour per box.
    else:
      assert not region.any()
  with pytest.raises(ValueError, match="mode"):
    ft.RandomErasing(mode="noise")
  counts = {len(ft.RandomErasing(1.0, max_count=3).boxes(rng, 32, 32)) for _ in range(200)}
  assert counts == {1, 2, 3}


# ---------------------------------------------------------------------------
# The per-example recipes
# ---------------------------------------------------------------------------
def test_finetune_and_linprobe_transforms_are_deterministic():
  image = random_image(4, (48, 40))
  for t in (ft.FinetuneTrain(32), ft.LinprobeTrain(32)):
    outs = [t(image, np.random.default_rng(np.random.SeedSequence([0, i]))) for i in range(6)]
    again = [t(image, np.random.default_rng(np.random.SeedSequence([0, i]))) for i in range(6)]
    # With random erasing (the recipe's default) the image is normalised on
    # the host (timm erases in that space); without it the pixels stay uint8.
    want = np.float32 if isinstance(t, ft.FinetuneTrain) else np.uint8
    for a, b in zip(outs, again):
      assert a.keys() == {"image"}
      assert a["image"].shape == (32, 32, 3) and a["image"].dtype == want
      np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(outs[0]["image"], outs[1]["image"])


def test_linprobe_crop_is_maes_single_draw():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    top, left, h, w = ft.mae_random_resized_crop_params(rng, 40, 30)
    assert 1 <= h <= 30 and 1 <= w <= 40
    assert 0 <= top <= 30 - h and 0 <= left <= 40 - w
  # No retry: large draws are clipped to the image, so full-height/width
  # crops are common (torchvision's loop would redraw them).
  draws = [ft.mae_random_resized_crop_params(rng, 32, 32) for _ in range(2000)]
  assert np.mean([h == 32 or w == 32 for _, _, h, w in draws]) > 0.1


def test_linprobe_is_mae_crop_bicubic_then_flip_then_normalise():
  image = random_image(5, (48, 40))
  t = ft.LinprobeTrain(32)
  for seed in range(8):
    out = t(image, np.random.default_rng(seed))["image"]
    rng = np.random.default_rng(seed)
    top, left, h, w = ft.mae_random_resized_crop_params(rng, 48, 40)
    expected = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    expected = transforms.random_horizontal_flip(expected, rng)
    np.testing.assert_array_equal(out, np.asarray(expected))
    np.testing.assert_array_equal(
      transforms.normalize(out), transforms.to_normalized_array(expected)
    )


# ---------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------
def constant_batch(batch=6, size=16, num_classes=5):
  images = np.broadcast_to(
    np.arange(batch, dtype=np.float32)[:, None, None, None], (batch, size, size, 3)
  ).copy()
  labels = np.arange(batch, dtype=np.int32) % num_classes
  return images, labels


def smoothed(labels, n, s):
  return np.eye(n, dtype=np.float32)[labels] * (1 - s) + s / n


def test_mixup_batch_matches_the_formula():
  m = mixup.Mixup(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
  images, labels = constant_batch()
  for seed in range(20):
    mixed, targets, info = m.mix(images, labels, np.random.default_rng(seed))
    lam = info["lam"]
    assert 0 <= lam <= 1 and not info["cutmix"]
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-6)
    y = smoothed(labels, 5, 0.1)
    np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert targets.dtype == np.float32 and mixed.dtype == np.float32
  np.testing.assert_array_equal(images, constant_batch()[0])  # Not modified.


def test_cutmix_box_area_matches_the_corrected_lam():
  m = mixup.Mixup(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
  images, labels = constant_batch(size=17)
  clipped = 0
  for seed in range(200):
    mixed, targets, info = m.mix(images, labels, np.random.default_rng(seed))
    lam = info["lam"]
    assert info["cutmix"] and 0 <= lam <= 1
    yl, yh, xl, xh = info["box"]
    assert 0 <= yl <= yh <= 17 and 0 <= xl <= xh <= 17
    pasted = mixed[0, ..., 0] == images[-1, 0, 0, 0]
    assert pasted.sum() == (yh - yl) * (xh - xl)
    assert pasted[yl:yh, xl:xh].all()
    assert lam == pytest.approx(1 - pasted.mean())
    y = smoothed(labels, 5, 0.1)
    np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-5)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    clipped += (yh - yl) * (xh - xl) < (17 * 17) * (1 - lam) - 1e-9
  assert clipped == 0


def test_rand_bbox_side_and_lam_correction():
  rng = np.random.default_rng(0)
  for lam in (0.0, 0.3, 0.75, 0.99):
    for _ in range(50):
      yl, yh, xl, xh = mixup.rand_bbox((20, 30), lam, rng)
      cut_h, cut_w = int(20 * math.sqrt(1 - lam)), int(30 * math.sqrt(1 - lam))
      # Centred on a uniform pixel with half-sides cut // 2, then clipped.
      assert yh - yl <= 2 * (cut_h // 2) and xh - xl <= 2 * (cut_w // 2)
      assert 0 <= yl <= yh <= 20 and 0 <= xl <= xh <= 30
  box, lam = mixup.cutmix_bbox_and_lam((20, 30), 0.5, rng)
  yl, yh, xl, xh = box
  assert lam == 1 - (yh - yl) * (xh - xl) / 600
  box, lam2 = mixup.cutmix_bbox_and_lam((20, 30), 0.5, rng, correct_lam=False)
  assert lam2 == 0.5
  box, lam = mixup.cutmix_bbox_and_lam((20, 30), 0.5, rng, ratio_minmax=(0.2, 0.8))
  yl, yh, xl, xh = box
  assert 4 <= yh - yl < 16 and 6 <= xh - xl < 24


def test_switch_probability_and_lam_law():
  m = mixup.Mixup(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  rng = np.random.default_rng(0)
  draws = [m.params(rng) for _ in range(4000)]
  lams = np.array([lam for lam, _ in draws])
  cut = np.array([c for _, c in draws])
  assert 0.46 < cut.mean() < 0.54
  assert lams.min() >= 0 and lams.max() <= 1
  # Beta(1, 1) (cutmix) is uniform: var 1/12; Beta(.8, .8): var 1/10.4.
  assert abs(lams[cut].var() - 1 / 12) < 0.01
  assert abs(lams[~cut].var() - 0.25 / 2.6) < 0.01
  never = mixup.Mixup(num_classes=10, mixup_alpha=0.8, prob=0.0)
  assert {never.params(rng) for _ in range(10)} == {(1.0, False)}


def test_no_mixing_gives_smoothed_one_hot_and_the_same_images():
  m = mixup.Mixup(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
  assert not m.active
  images, labels = constant_batch(batch=5)  # Odd is fine without mixing.
  batch = m({"image": images, "label": labels}, np.random.default_rng(0))
  np.testing.assert_array_equal(batch["image"], images)
  np.testing.assert_allclose(batch["label_soft"], smoothed(labels, 5, 0.1), rtol=1e-6)
  assert batch["label_soft"][0, 0] == pytest.approx(0.9 + 0.02)
  with pytest.raises(ValueError, match="even batch"):
    mixup.Mixup(num_classes=5, mixup_alpha=0.8).mix(images, labels, np.random.default_rng(0))
  with pytest.raises(ValueError, match="num_classes"):
    mixup.one_hot(np.array([5]), 5)
  minmax = mixup.Mixup(num_classes=5, mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8))
  assert minmax.active and minmax.cutmix_alpha == 1.0


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------
def test_finetune_and_linprobe_batches_have_the_documented_layout(data_dir):
  (batch,) = take(input_pipeline.make_dataset(make_config(data_dir), split="train", train=True), 1)
  assert sorted(batch) == ["image", "label", "label_soft"]
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["image"].dtype == np.float32  # mixup blends normalised images
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["label_soft"].shape == (16, 10)
  assert batch["label_soft"].dtype == np.float32
  np.testing.assert_allclose(batch["label_soft"].sum(-1), 1.0, rtol=1e-6)
  assert batch["label_soft"].min() >= 0.1 / 10 - 1e-7

  (batch,) = take(
    input_pipeline.make_dataset(
      make_config(data_dir, augment="linprobe"), split="train", train=True
    ),
    1,
  )
  assert sorted(batch) == ["image", "label"]
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["image"].dtype == np.uint8

  # Eval batches of a fine-tuning config are not mixed.
  (batch,) = take(
    input_pipeline.make_dataset(make_config(data_dir, augment="eval"), split="test", train=False), 1
  )
  assert sorted(batch) == ["image", "label", "mask"]


def test_finetune_batches_are_deterministic_and_resumable(data_dir):
  config = make_config(data_dir, batch_size=8)
  make = lambda **kw: input_pipeline.make_dataset(  # noqa: E731
    config, split="test", train=True, **kw
  )
  a = take(make(), 3)
  b = take(make(), 3)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  c = take(make(seed=1), 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  # Resuming after batch 1 gives batches 2 and 3 again (same mixing).
  it = iter(make())
  next(it)
  state = it.get_state()
  it.close()
  it = iter(make())
  it.set_state(state)
  for expected in a[1:]:
    got = next(it)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  it.close()


def test_pipeline_without_mixing_emits_smoothed_one_hot(data_dir):
  config = make_config(
    data_dir, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0, label_smoothing=0.1
  )
  (batch,) = take(input_pipeline.make_dataset(config, split="test", train=True), 1)
  np.testing.assert_allclose(batch["label_soft"], smoothed(batch["label"], 10, 0.1), rtol=1e-6)
  # Without RandAugment and erasing the recipe is the torchvision crop
  # (0.08, 1) + flip: the per-example stream is the same as 'mae' with that
  # scale.
  mae = take(
    input_pipeline.make_dataset(
      make_config(data_dir, augment="mae", crop_scale=(0.08, 1.0)), split="test", train=True
    ),
    1,
  )[0]
  np.testing.assert_array_equal(batch["image"], mae["image"])
  # num_classes from the config wins over the dataset's.
  config = make_config(data_dir, mixup=0.0, cutmix=0.0, num_classes=12)
  (batch,) = take(input_pipeline.make_dataset(config, split="test", train=True), 1)
  assert batch["label_soft"].shape == (16, 12)


@pytest.mark.parametrize(
  "overrides, match",
  [
    (dict(remode="noise"), "mode"),
    (dict(auto_augment="augmix-m5"), "only RandAugment"),
    (dict(mixup=-1.0), "mixup_alpha"),
    (dict(mixup_mode="elem"), "mode"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(batch_size=8, process_count=8), "odd host batch"),
  ],
)
def test_bad_finetune_configs_fail_before_preparing(tmp_path, overrides, match):
  overrides = dict(overrides)
  process_count = overrides.pop("process_count", 1)
  config = make_config(str(tmp_path / "never_prepared"), **overrides)
  with pytest.raises(ValueError, match=match):
    input_pipeline.make_dataset(
      config, split="train", train=True, process_index=0, process_count=process_count
    )
  assert not (tmp_path / "never_prepared").exists()


def test_finetune_pipelines_never_import_tensorflow(data_dir):
  for augment in ("finetune", "linprobe"):
    take(
      input_pipeline.make_dataset(make_config(data_dir, augment=augment), split="test", train=True),
      1,
    )
  assert "tensorflow" not in sys.modules
