"""BEiT / CAE block-wise masking: counts, errors, and the official masks."""

import json
import random

import numpy as np
import pytest
from conftest import REPO

from mimdistill.data.block_masking import (
  MASKED_PATCHES,
  BlockMaskGenerator,
  connected_block_sizes,
  mask_statistics,
  masked_patches_for,
)


def official_generator(size: str) -> BlockMaskGenerator:
  """The CAE v2 pre-training setting for ViT-T/S/B on 224 px, patch 16."""
  return BlockMaskGenerator(14, masked_patches_for(size), min_num_patches=16)


def test_official_counts_per_size():
  assert MASKED_PATCHES == {"tiny": 30, "small": 49, "base": 98}
  assert masked_patches_for("base") == 98
  assert masked_patches_for("tiny", (7, 7)) == round(30 / 4)
  with pytest.raises(ValueError, match="no official"):
    masked_patches_for("large")
  assert repr(official_generator("base")) == (
    "Generator(14, 14 -> [16 ~ 98], max = 98, -1.204 ~ 1.204)"
  )


@pytest.mark.parametrize("size", sorted(MASKED_PATCHES))
def test_exact_count_with_numpy(size):
  gen = official_generator(size)
  masks = gen.batch(np.random.default_rng(0), 50)
  assert masks.shape == (50, 14, 14) and masks.dtype == bool
  assert np.all(masks.reshape(50, -1).sum(1) == MASKED_PATCHES[size])
  # Reproducible from the seed, different across draws.
  np.testing.assert_array_equal(masks, gen.batch(np.random.default_rng(0), 50))
  assert len({m.tobytes() for m in masks}) > 40


def test_small_grids_and_extreme_counts():
  for n in (1, 5, 15):
    gen = BlockMaskGenerator((4, 4), n, min_num_patches=1)
    assert gen(np.random.default_rng(n)).sum() == n
    assert gen(random.Random(n)).sum() == n


@pytest.mark.parametrize("count", [0, 16, 17])
def test_masked_count_must_leave_a_visible_patch(count):
  with pytest.raises(ValueError, match="num_masking_patches"):
    BlockMaskGenerator((4, 4), count)


def test_rng_type_is_checked():
  with pytest.raises(TypeError, match="Generator"):
    BlockMaskGenerator(4, 4)(np.random.RandomState(0))


def test_connected_block_sizes():
  mask = np.zeros((5, 5), bool)
  mask[0:2, 0:2] = True  # a 2x2 block
  mask[3, 3:5] = True  # a 1x2 block
  mask[4, 0] = True  # a single cell
  assert sorted(connected_block_sizes(mask)) == [1, 2, 4]
  stats = mask_statistics(mask[None])
  assert stats["counts"].tolist() == [7] and stats["regions"].tolist() == [3]


@pytest.fixture(scope="module")
def caev2_fixture():
  folder = REPO / "tests" / "fixtures" / "caev2"  # a copy of ../shared/fixtures/caev2
  if not folder.exists():
    pytest.skip(f"{folder} is absent")
  return json.loads((folder / "config.json").read_text()), np.load(folder / "expected.npz")


@pytest.mark.parametrize("size", ["T", "S", "B"])
def test_python_random_reproduces_official_masks(caev2_fixture, size):
  config, expected = caev2_fixture
  cfg = config["mask_generator_samples"][size]
  gen = BlockMaskGenerator(
    tuple(cfg["grid"]),
    cfg["num_masking_patches"],
    cfg["min_num_patches"],
    cfg["max_num_patches"],
    cfg["min_aspect"],
  )
  assert repr(gen) == cfg["repr"]
  ours = gen.batch(random.Random(cfg["python_random_seed"]), cfg["samples"])
  np.testing.assert_array_equal(ours, expected[f"mask_generator/{size}"])


@pytest.mark.parametrize("size, name", [("T", "tiny"), ("S", "small"), ("B", "base")])
def test_numpy_masks_have_the_official_statistics(caev2_fixture, size, name):
  """Another RNG, the same process: exact counts, block sizes and the
  per-position frequency of the 200 official masks."""
  config, expected = caev2_fixture
  assert config["mask_generator_samples"][size]["num_masking_patches"] == MASKED_PATCHES[name]
  official = mask_statistics(expected[f"mask_generator/{size}"])
  ours = mask_statistics(official_generator(name).batch(np.random.default_rng(1), 600))
  assert np.all(official["counts"] == MASKED_PATCHES[name])
  assert np.all(ours["counts"] == MASKED_PATCHES[name])
  for stat in ("regions", "region_sizes"):
    se = official[stat].std() / np.sqrt(len(official[stat]))
    assert abs(ours[stat].mean() - official[stat].mean()) < 4 * se, stat
  # Block sizes: the same distribution (two-sample Kolmogorov-Smirnov
  # distance below its 1% critical value).
  a, b = np.sort(official["region_sizes"]), np.sort(ours["region_sizes"])
  grid = np.union1d(a, b)
  ks = np.abs(
    np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)
  )
  assert ks.max() < 1.63 * np.sqrt((len(a) + len(b)) / (len(a) * len(b)))
  corr = np.corrcoef(official["frequency"].ravel(), ours["frequency"].ravel())[0, 1]
  assert corr > 0.9
  np.testing.assert_allclose(
    official["frequency"], expected[f"mask_generator_frequency/{size}"], atol=1e-6
  )
