"""BEiT-style block-wise masking (Atten4Vis/CAE `furnace/masking_generator.py`
`MaskingGenerator`, the same as BEiT's).

Blocks of random area and aspect ratio are added until exactly
`num_masking_patches` cells of the patch grid are masked. One call:

  mask = zeros(H, W); count = 0
  while count != num_masking_patches:
    max_mask = min(num_masking_patches - count, max_num_patches)
    up to 10 attempts:
      target_area = uniform(min_num_patches, max_mask)
      aspect = exp(uniform(log(min_aspect), log(max_aspect)))
      h = int(round(sqrt(target_area * aspect))); w = int(round(sqrt(target_area / aspect)))
      if w < W and h < H:
        top = randint(0, H - h); left = randint(0, W - w)        (inclusive)
        if 0 < h*w - (already masked in the block) <= max_mask: mask the block
      stop the attempts once a block added cells
    count += cells added

(`uniform(a, b)` = a + (b - a) U[0, 1), also when a > b, as Python's.)

The random source is a numpy `Generator` (the project's default) or a
Python `random.Random`, with which the official generator's masks are
reproduced exactly (the official code calls the global `random` module the
same way after `random.seed(seed)`).

`MASKED_PATCHES` are the official CAE v2 scripts' `--num_mask_patches` for a
14 x 14 grid (ViT-T / S / B: 30 / 49 / 98 of 196), with
`--min_mask_patches_per_block 16`, aspect ratios [0.3, 1/0.3] and no
`--max_mask_patches_per_block`.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

# Official CAE v2 scripts (project/CAEv2/scripts/caev2_{tiny,small,base}_300e.sh).
MASKED_PATCHES = {"tiny": 30, "small": 49, "base": 98}
OFFICIAL_GRID = (14, 14)
MIN_MASK_PATCHES_PER_BLOCK = 16  # run_pretraining.py --min_mask_patches_per_block
MIN_ASPECT = 0.3

# One call stops after this many rounds without reaching the target count;
# the official loop has no bound (it cannot loop forever for a reachable
# count, but a hopeless setting would hang a data worker).
_MAX_ROUNDS = 100_000


def masked_patches_for(size: str, grid: tuple[int, int] = OFFICIAL_GRID) -> int:
  """The official count for a model size ('tiny' | 'small' | 'base'), scaled
  by area to another grid (rounded; the official scripts only use 14 x 14)."""
  if size not in MASKED_PATCHES:
    raise ValueError(
      f"no official CAE v2 masked-patch count for size {size!r}; known: {sorted(MASKED_PATCHES)}"
      " (set the count directly for other sizes)"
    )
  base = MASKED_PATCHES[size]
  cells = grid[0] * grid[1]
  if tuple(grid) == OFFICIAL_GRID:
    return base
  return max(1, min(cells - 1, int(round(base * cells / (OFFICIAL_GRID[0] * OFFICIAL_GRID[1])))))


class _Source:
  """uniform(a, b) and inclusive randint(a, b) over either random source."""

  def __init__(self, rng: Any):
    if isinstance(rng, random.Random):
      self.uniform, self.randint = rng.uniform, rng.randint
    elif isinstance(rng, np.random.Generator):
      self.uniform = lambda a, b: a + (b - a) * float(rng.random())
      self.randint = lambda a, b: int(rng.integers(a, b + 1))
    else:
      raise TypeError(
        f"block masking needs a numpy Generator or a random.Random, got {type(rng).__name__}"
      )


class BlockMaskGenerator:
  """`MaskingGenerator(input_size, num_masking_patches, min_num_patches,
  max_num_patches, min_aspect, max_aspect)`; `__call__(rng)` gives an
  `(H, W)` bool mask (True = masked) with exactly `num_masking_patches`."""

  def __init__(
    self,
    input_size: int | tuple[int, int],
    num_masking_patches: int,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = MIN_ASPECT,
    max_aspect: float | None = None,
  ):
    self.height, self.width = (
      (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    )
    self.num_patches = self.height * self.width
    if not 0 < num_masking_patches < self.num_patches:
      raise ValueError(
        f"num_masking_patches={num_masking_patches} must be in 1..{self.num_patches - 1} for "
        f"a {self.height}x{self.width} patch grid: CAE v2 needs at least one visible and one "
        "masked patch (and a block is always narrower than the grid)"
      )
    if min_num_patches < 1:
      raise ValueError(f"min_num_patches={min_num_patches} must be >= 1")
    if not 0 < min_aspect <= 1:
      raise ValueError(f"min_aspect={min_aspect} must be in (0, 1]")
    self.num_masking_patches = int(num_masking_patches)
    self.min_num_patches = int(min_num_patches)
    self.max_num_patches = (
      self.num_masking_patches if max_num_patches is None else int(max_num_patches)
    )
    max_aspect = max_aspect or 1 / min_aspect
    self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  def __repr__(self) -> str:
    low, high = self.log_aspect_ratio
    return (
      f"Generator({self.height}, {self.width} -> [{self.min_num_patches} ~ "
      f"{self.max_num_patches}], max = {self.num_masking_patches}, {low:.3f} ~ {high:.3f})"
    )

  def _add_block(self, mask: np.ndarray, max_mask: int, src: _Source) -> int:
    delta = 0
    for _ in range(10):
      target_area = src.uniform(self.min_num_patches, max_mask)
      aspect = math.exp(src.uniform(*self.log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < self.width and h < self.height:
        top = src.randint(0, self.height - h)
        left = src.randint(0, self.width - w)
        block = mask[top : top + h, left : left + w]
        new = h * w - int(block.sum())
        if 0 < new <= max_mask:
          block[...] = True
          delta += new
        if delta > 0:
          break
    return delta

  def __call__(self, rng: np.random.Generator | random.Random) -> np.ndarray:
    src = _Source(rng)
    mask = np.zeros((self.height, self.width), bool)
    count = 0
    for _ in range(_MAX_ROUNDS):
      if count == self.num_masking_patches:
        return mask
      max_mask = min(self.num_masking_patches - count, self.max_num_patches)
      count += self._add_block(mask, max_mask, src)
    raise RuntimeError(
      f"{self!r} reached {count} of {self.num_masking_patches} masked patches after "
      f"{_MAX_ROUNDS} rounds; lower min_num_patches or the masked count"
    )

  def batch(self, rng: np.random.Generator | random.Random, batch_size: int) -> np.ndarray:
    """`(batch_size, H, W)` masks, one call per image in order."""
    return np.stack([self(rng) for _ in range(batch_size)])


def connected_block_sizes(mask: np.ndarray) -> list[int]:
  """Sizes of the 4-connected masked regions of one `(H, W)` mask (overlapping
  or touching blocks merge): the block-size statistic of a mask sample."""
  mask = np.asarray(mask, bool)
  seen = np.zeros_like(mask)
  h, w = mask.shape
  sizes = []
  for i, j in zip(*np.nonzero(mask)):
    if seen[i, j]:
      continue
    seen[i, j] = True
    stack, size = [(i, j)], 0
    while stack:
      y, x = stack.pop()
      size += 1
      for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
          seen[ny, nx] = True
          stack.append((ny, nx))
    sizes.append(size)
  return sizes


def mask_statistics(masks: np.ndarray) -> dict[str, np.ndarray]:
  """Per-mask masked counts and region counts, all region sizes, and the
  per-cell masking frequency of a `(S, H, W)` sample."""
  masks = np.asarray(masks, bool)
  regions = [connected_block_sizes(m) for m in masks]
  return {
    "counts": masks.reshape(len(masks), -1).sum(1),
    "regions": np.asarray([len(r) for r in regions]),
    "region_sizes": np.asarray([s for r in regions for s in r]),
    "frequency": masks.mean(0),
  }
