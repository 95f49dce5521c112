"""BEiT-style relative position bias: the index into a per-block table.

The table has `(2*gh - 1) * (2*gw - 1)` rows for the patch-to-patch offsets
plus 3 rows per prefix token layout (BEiT: CLS->patch, patch->CLS, CLS->CLS);
each row holds one bias per head. The index is a pure function of the patch
grid and the number of prefix tokens, so it is computed, never stored: the
official modules keep it as a buffer (`relative_position_index`), which the
converters compare with this one and then drop.
"""

from __future__ import annotations

import numpy as np


def num_relative_distances(grid: tuple[int, int], num_prefix_tokens: int = 1) -> int:
  """Rows of the bias table for a `grid` of patches and 1 (CLS) or 2 (CLS and
  distillation) prefix tokens."""
  gh, gw = grid
  return (2 * gh - 1) * (2 * gw - 1) + 3 * num_prefix_tokens


def relative_position_index(grid: tuple[int, int], num_prefix_tokens: int = 1) -> np.ndarray:
  """`(N, N)` int32 index into the table, N = prefix tokens + gh * gw.

  Patch pairs follow BEiT (`relative_coords` of the row and column offsets,
  the row offset scaled by `2*gw - 1`). With one prefix token (BEiT /
  TinyMIM): row 0 (CLS -> all) is T-3, column 0 (all -> CLS) T-2, [0, 0] T-1
  (T = table rows). With a distillation token (TinyMIM*-T's backbone) the
  dist token's row, column and self entry come first (T-6, T-5, T-4), then
  the CLS ones as above, later writes winning: so CLS->dist is T-3 and
  dist->CLS is T-2, as the official code leaves them.
  """
  if num_prefix_tokens not in (1, 2):
    raise ValueError(
      f"relative position bias supports 1 or 2 prefix tokens, got {num_prefix_tokens}"
    )
  gh, gw = grid
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
  offsets = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  offsets[:, :, 0] += gh - 1
  offsets[:, :, 1] += gw - 1
  offsets[:, :, 0] *= 2 * gw - 1
  table_rows = num_relative_distances(grid, num_prefix_tokens)
  p = num_prefix_tokens
  index = np.zeros((gh * gw + p, gh * gw + p), np.int32)
  index[p:, p:] = offsets.sum(-1)
  if p == 2:
    index[1, :] = table_rows - 6
    index[:, 1] = table_rows - 5
    index[1, 1] = table_rows - 4
  index[0, :] = table_rows - 3
  index[:, 0] = table_rows - 2
  index[0, 0] = table_rows - 1
  return index
