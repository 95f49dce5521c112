"""Teacher vs student Q-K relation maps (stage 2's `relation_maps.png`).

The Q-K relation TinyMIM distils is, per relation head, `softmax(Q K^T /
sqrt(d_R))` over all tokens (CLS included). For a query token its row is an
attention distribution over the keys; averaged over the R heads and
restricted to the patch keys it is a map over the patch grid. The figure
puts the teacher's map (at its target block) next to the student's (at its
last block) for a few eval images and query tokens: the CLS token and a few
patch tokens, each marked on the image.

Token order: 0 is CLS, `1 + r * grid + c` the patch in row r, column c.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from mimdistill.visualize import new_figure, save_figure

Query = int | str | tuple  # token index, 'cls', or (row, col) of a patch
QUERY_COLOURS = (
  "#ff7f0e",
  "#d62728",
  "#2ca02c",
  "#9467bd",
  "#17becf",
  "#e377c2",
  "#bcbd22",
  "#8c564b",
)


# -----------------------------------------------------------------------------
# Numbers
# -----------------------------------------------------------------------------
def qk_attention(q, k) -> np.ndarray:
  """Head-averaged Q-K relation `(B, N, N)` (rows sum to 1) from q, k
  `(B, R, N, d)`, computed like the distillation loss (float32 logits, the
  `relations` module's scaling, softmax over keys)."""
  import jax

  from mimdistill.objectives.relations import relation_logits

  probs = jax.nn.softmax(relation_logits(q, k), axis=-1)
  return np.asarray(jax.device_get(probs.mean(axis=1)), np.float32)


def encoder_attention(encoder, variables, images, *, block: int, heads: int) -> np.ndarray:
  """`qk_attention` of a `ViTEncoder`'s block `block` (1-based; eval mode),
  split into `heads` relation heads, for NHWC normalised `images`."""
  import jax

  from mimdistill.models.vit import ViTEncoder

  @jax.jit
  def qkv(v, x):
    return encoder.apply(v, x, block=block, heads=heads, method=ViTEncoder.relation_qkv)

  q, k, _ = qkv(variables, np.asarray(images, np.float32))
  if getattr(encoder, "dist_token", False):
    # A distillation token is no relation token (the stage excludes it by
    # default): the maps are over [CLS, patches] like the teacher's.
    q, k = (np.concatenate([x[:, :, :1], x[:, :, 2:]], axis=2) for x in (q, k))
  return qk_attention(q, k)


def default_queries(grid: int) -> tuple[Query, ...]:
  """CLS, the centre patch and two off-centre patches."""
  a, b = grid // 4, (3 * grid) // 4
  out = ["cls", (grid // 2, grid // 2), (a, a), (b, a)]
  unique = []
  for q in out:
    if q not in unique:
      unique.append(q)
  return tuple(unique)


def token_index(query: Query, grid: int) -> int:
  """Token index of a query given as an index, 'cls' or (row, col)."""
  if isinstance(query, str):
    if query.lower() != "cls":
      raise ValueError(f"query {query!r}: use 'cls', a token index or (row, col)")
    return 0
  if isinstance(query, (tuple, list)):
    r, c = (int(x) for x in query)
    if not (0 <= r < grid and 0 <= c < grid):
      raise ValueError(f"query patch {(r, c)} is outside the {grid}x{grid} grid")
    return 1 + r * grid + c
  i = int(query)
  if not 0 <= i <= grid * grid:
    raise ValueError(f"query token {i} is outside 0..{grid * grid} (0 = CLS)")
  return i


def token_label(index: int, grid: int) -> str:
  if index == 0:
    return "CLS"
  r, c = divmod(index - 1, grid)
  return f"patch ({r},{c})"


def query_maps(attention: np.ndarray, queries: Sequence[Query], grid: int) -> np.ndarray:
  """`(B, N, N)` relations -> `(B, Q, grid, grid)` maps over the patch keys
  for each query (not renormalised: the CLS key's share is left out)."""
  attention = np.asarray(attention)
  n = attention.shape[-1]
  if n != grid * grid + 1:
    raise ValueError(
      f"relations have {n} tokens; a {grid}x{grid} grid plus CLS has {grid * grid + 1}"
    )
  rows = [token_index(q, grid) for q in queries]
  return attention[:, rows, 1:].reshape(attention.shape[0], len(rows), grid, grid)


def row_kl(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
  """KL(teacher || student) of each relation row `(..., N)` (the loss's term)."""
  t = np.clip(np.asarray(teacher, np.float64), 1e-12, None)
  s = np.clip(np.asarray(student, np.float64), 1e-12, None)
  return np.sum(t * (np.log(t) - np.log(s)), axis=-1)


# -----------------------------------------------------------------------------
# The figure
# -----------------------------------------------------------------------------
def _display(image: np.ndarray, normalized: bool) -> np.ndarray:
  image = np.asarray(image, np.float32)
  if normalized:
    from mimdistill.data.transforms import denormalize

    image = denormalize(image)
  return np.clip(image, 0.0, 1.0)


def plot_relation_maps(
  images,
  teacher_attention,
  student_attention,
  path: str | os.PathLike,
  *,
  queries: Sequence[Query] | None = None,
  normalized: bool = True,
  names: tuple[str, str] = ("teacher", "student"),
  title: str | None = None,
) -> epath.Path:
  """Writes the side-by-side figure and returns `path`.

  images: `(B, H, W, 3)` as the models saw them (ImageNet-normalised unless
    `normalized=False`, then in [0, 1]).
  teacher_attention, student_attention: `(B, N, N)` head-averaged relations
    (`qk_attention`), N = grid**2 + 1.
  queries: tokens to show (default: CLS and three patches).

  One row per image: the image with the query patches outlined, then per
  query the teacher's and the student's map on a colour scale shared by the
  pair (0 to the larger peak); under the student map KL(teacher || student)
  of that relation row, the quantity the distillation loss averages.
  """
  t_att, s_att = np.asarray(teacher_attention), np.asarray(student_attention)
  if t_att.shape != s_att.shape:
    raise ValueError(
      f"teacher relations {t_att.shape} and student relations "
      f"{s_att.shape} differ; both need the same images and "
      "tokens"
    )
  images = np.asarray(images)
  b, n = t_att.shape[0], t_att.shape[-1]
  grid = int(round((n - 1) ** 0.5))
  if images.shape[0] != b:
    raise ValueError(f"{images.shape[0]} images but relations of {b}")
  queries = list(queries or default_queries(grid))
  tokens = [token_index(q, grid) for q in queries]
  t_maps = query_maps(t_att, tokens, grid)
  s_maps = query_maps(s_att, tokens, grid)
  kl = row_kl(t_att[:, tokens], s_att[:, tokens])  # (B, Q)
  patch_px = images.shape[1] / grid

  from matplotlib.patches import Rectangle

  cols = 1 + 2 * len(tokens)
  cell = 1.35
  fig = new_figure(cell * cols + 0.3, cell * b + 0.9)
  axes = fig.subplots(b, cols, squeeze=False)
  for i in range(b):
    ax = axes[i, 0]
    ax.imshow(_display(images[i], normalized), interpolation="nearest")
    for j, tok in enumerate(tokens):
      colour = QUERY_COLOURS[j % len(QUERY_COLOURS)]
      if tok == 0:
        ax.add_patch(
          Rectangle(
            (0, 0), images.shape[2] - 1, images.shape[1] - 1, fill=False, lw=1.2, ls="--", ec=colour
          )
        )
      else:
        r, c = divmod(tok - 1, grid)
        ax.add_patch(
          Rectangle(
            (c * patch_px - 0.5, r * patch_px - 0.5),
            patch_px,
            patch_px,
            fill=False,
            lw=1.5,
            ec=colour,
          )
        )
    if i == 0:
      ax.set_title("image", fontsize=8)
    for j, tok in enumerate(tokens):
      colour = QUERY_COLOURS[j % len(QUERY_COLOURS)]
      vmax = float(max(t_maps[i, j].max(), s_maps[i, j].max(), 1e-12))
      for side, maps in enumerate((t_maps, s_maps)):
        ax = axes[i, 1 + 2 * j + side]
        ax.imshow(maps[i, j], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        if tok:
          r, c = divmod(tok - 1, grid)
          ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=1.2, ec=colour))
        for spine in ax.spines.values():
          spine.set_edgecolor(colour)
          spine.set_linewidth(1.5)
        if i == 0:
          ax.set_title(f"{token_label(tok, grid)}\n{names[side]}", fontsize=8, color=colour)
        label = f"peak {maps[i, j].max():.2f}" if side == 0 else f"KL {kl[i, j]:.2f}"
        ax.set_xlabel(label, fontsize=7, labelpad=1)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(
    title
    or (
      f"Q-K relation maps, {names[0]} vs {names[1]} "
      "(head-averaged attention of each query over the "
      "patch keys)"
    ),
    fontsize=9,
  )
  fig.subplots_adjust(wspace=0.08, hspace=0.3)
  return save_figure(fig, path)


def save_relation_maps(
  images,
  teacher,
  teacher_variables,
  student,
  student_variables,
  path: str | os.PathLike,
  *,
  teacher_block: int,
  student_block: int,
  heads: int,
  student_heads: int | None = None,
  queries: Sequence[Query] | None = None,
  title: str | None = None,
) -> epath.Path:
  """Runs both encoders (`ViTEncoder`s, eval mode) on `images` and writes
  `plot_relation_maps`. `heads` is the distillation's R; `student_heads`
  (default R) is for a student width R does not divide."""
  t_att = encoder_attention(teacher, teacher_variables, images, block=teacher_block, heads=heads)
  s_att = encoder_attention(
    student, student_variables, images, block=student_block, heads=student_heads or heads
  )
  title = title or (
    f"Q-K relations (R={heads} heads, averaged): teacher block {teacher_block}"
    f" vs student block {student_block}; each pair on one colour scale"
  )
  return plot_relation_maps(images, t_att, s_att, path, queries=queries, title=title)


def host_copy(tree):
  """`tree` as numpy on this host. With several processes this gathers
  sharded arrays and is a collective: every process must call it."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
