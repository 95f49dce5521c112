"""Fixed 2-D sin-cos position embeddings and their resize.

`sincos_2d` and the bicubic resize follow MAE's `util/pos_embed.py` bit for
bit: the embedding is built in float64 (the official code uses numpy float64
and casts once at the end) and the resize reproduces
`torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` (cubic
convolution with a = -0.75, border-clamped taps). `mode='bilinear'` is the
same call in bilinear mode (CLIP's `resize_pos_embed` in Atten4Vis/CAE).

`cae_sincos_2d` is CAE's own layout (`build_2d_sincos_position_embedding`):
the FIRST half of the channels encodes the row, computed in float32 as torch
does.
"""

from __future__ import annotations

import numpy as np


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even width per axis, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """Returns `(cls + gh*gw, dim)` float32; row-major patches, CLS row zeros.

  MAE builds `np.meshgrid(w, h)` so the FIRST half of the channels encodes the
  column (w) index and the second half the row (h) index.
  """
  if dim % 4:
    raise ValueError(
      f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}; "
      "pick an embed dim that is a multiple of 4."
    )
  gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def cae_sincos_2d(
  dim: int, grid_size: int | tuple[int, int], cls_token: bool = True, temperature: float = 10000.0
) -> np.ndarray:
  """Atten4Vis/CAE `build_2d_sincos_position_embedding`: `(cls + gh*gw, dim)`.

  CAE calls `torch.meshgrid(arange(w), arange(h))` with 'ij' indexing, so
  for the token m = r * W + c its "w" value is the row r and its "h" value
  the column c: each row is `[sin(r w), cos(r w), sin(c w), cos(c w)]` with
  `w = 1 / temperature ** (arange(dim/4) / (dim/4))`, the opposite order of
  MAE's `sincos_2d`. Computed in float32 like the official torch code; the
  CLS row (prepended with `cls_token`) is zeros.
  """
  if dim % 4:
    raise ValueError(
      f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}; "
      "pick an embed dim that is a multiple of 4."
    )
  gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  if gh != gw:
    # CAE's meshgrid(arange(w), arange(h)) flattens a w-by-h grid, which is the
    # raster order of the patches only for a square grid.
    raise ValueError(f"CAE's sin-cos embedding is defined for square grids, got {gh}x{gw}")
  pos_dim = dim // 4
  omega = np.arange(pos_dim, dtype=np.float32) / np.float32(pos_dim)
  omega = (np.float32(1.0) / np.float32(temperature) ** omega).astype(np.float32)
  rows, cols = np.meshgrid(
    np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij"
  )
  out_r = np.einsum("m,d->md", rows.reshape(-1), omega).astype(np.float32)
  out_c = np.einsum("m,d->md", cols.reshape(-1), omega).astype(np.float32)
  emb = np.concatenate([np.sin(out_r), np.cos(out_r), np.sin(out_c), np.cos(out_c)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim), np.float32), emb], axis=0)
  return emb.astype(np.float32)


def _torch_bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """`(out, in)` matrix of torch's bilinear interpolation (align_corners=False,
  no antialias): source index `(o + 0.5) * in / out - 0.5` clamped at 0, the
  upper tap clamped to the last row."""
  scale = in_size / out_size
  mat = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = max((o + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = min(max(src - i0, 0.0), 1.0)
    mat[o, i0] += 1.0 - frac
    mat[o, i1] += frac
  return mat


RESIZE_MODES = ("bicubic", "bilinear")


def _torch_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """`(out, in)` matrix of torch's bicubic (a=-0.75, align_corners=False)."""
  a = -0.75

  def cubic(t):
    t = np.abs(t)
    return np.where(
      t <= 1,
      ((a + 2) * t - (a + 3)) * t * t + 1,
      np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
    )

  scale = in_size / out_size
  mat = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    frac = src - base
    for tap in range(-1, 3):
      idx = min(max(base + tap, 0), in_size - 1)
      mat[o, idx] += cubic(tap - frac)
  return mat


def resize_pos_embed(
  pos_embed: np.ndarray,
  new_grid: int | tuple[int, int],
  num_extra_tokens: int = 1,
  mode: str = "bicubic",
) -> np.ndarray:
  """Resizes a `(1, extra + g*g, D)` (or `(extra + g*g, D)`) embedding to
  another patch grid.

  The extra (CLS) rows are kept, patch rows are resized as
  `F.interpolate(mode=mode, align_corners=False)`: bicubic as MAE's
  `util/pos_embed.interpolate_pos_embed`, bilinear as CLIP's
  `resize_pos_embed` in Atten4Vis/CAE. Computed in float32 like torch.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")
  pos_embed = np.asarray(pos_embed)
  squeeze = pos_embed.ndim == 2
  if squeeze:
    pos_embed = pos_embed[None]
  extra = pos_embed[:, :num_extra_tokens]
  patches = pos_embed[:, num_extra_tokens:]
  old = int(round(np.sqrt(patches.shape[1])))
  if old * old != patches.shape[1]:
    raise ValueError(
      f"position embedding has {patches.shape[1]} patch rows, not a square grid; "
      f"check num_extra_tokens (got {num_extra_tokens})."
    )
  nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
  if (nh, nw) == (old, old):
    return pos_embed[0] if squeeze else pos_embed
  grid = patches.reshape(patches.shape[0], old, old, -1).astype(np.float32)
  weights = _torch_bicubic_weights if mode == "bicubic" else _torch_bilinear_weights
  wh = weights(old, nh).astype(np.float32)
  ww = weights(old, nw).astype(np.float32)
  # Separable: rows then columns, as torch's upsample_bicubic2d does.
  out = np.einsum("oh,bhwd->bowd", wh, grid)
  out = np.einsum("pw,bowd->bopd", ww, out)
  out = out.reshape(patches.shape[0], nh * nw, -1).astype(pos_embed.dtype)
  result = np.concatenate([extra, out], axis=1)
  return result[0] if squeeze else result
