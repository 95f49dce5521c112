"""The teacher-token regression of the heterogeneous (H-GKD-style)
distillation: a CNN student's predicted tokens vs a ViT teacher's patch
tokens.

H-GKD (arXiv 2309.09571) publishes no loss details; this one is OUR design,
in the family of feature-target MIM (MaskFeat, MILAN, TinyMIM's feature
target): the teacher's tokens are whitened per token (LayerNorm without
affine, eps 1e-6, `distill_targets.whiten`), the per-token loss is the mean
over channels of smooth-L1 (torch `smooth_l1_loss`, `beta`) or of the
squared error, and the loss averages it over the chosen positions:
  'masked'   tokens whose stride-32 mask cell is masked (predicted from
             context, as MIM),
  'visible'  tokens of visible cells (feature mimicking),
  'all'      every token.
A mask cell covers `(32 / patch)^2` tokens; `active` is repeated to the token
grid like every sparse layer repeats it (`models/sparse.mask_at`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mimdistill.models import sparse
from mimdistill.objectives.distill_targets import whiten

LOSSES = ("smooth_l1", "mse")
POSITIONS = ("masked", "visible", "all")


def token_losses(pred: jax.Array, target: jax.Array, loss: str, beta: float = 2.0) -> jax.Array:
  """`(B, N)`: the per-token loss of `pred` vs the whitened `target` (both
  `(B, N, D)`)."""
  if pred.shape != target.shape:
    raise ValueError(f"predicted tokens {pred.shape} vs teacher tokens {target.shape}")
  pred, target = pred.astype(jnp.float32), whiten(target)
  if loss == "mse":
    return jnp.mean(jnp.square(pred - target), axis=-1)
  if loss != "smooth_l1":
    raise ValueError(f"loss={loss!r} is not one of {LOSSES}")
  if beta == 0:
    return jnp.mean(jnp.abs(pred - target), axis=-1)
  return jnp.mean(optax.losses.huber_loss(pred, target, delta=beta), axis=-1) / beta


def position_weights(active: jax.Array, grid: int, positions: str) -> jax.Array:
  """`(B, grid * grid)` float weights of the tokens a loss counts."""
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r} is not one of {POSITIONS}")
  visible = sparse.mask_at(active, grid, grid, jnp.float32).reshape(active.shape[0], -1)
  if positions == "visible":
    return visible
  if positions == "masked":
    return 1.0 - visible
  return jnp.ones_like(visible)


def token_regression_loss(
  pred: jax.Array,
  teacher_tokens: jax.Array,
  active: jax.Array,
  *,
  positions: str,
  loss: str,
  beta: float = 2.0,
) -> jax.Array:
  """The mean per-token loss over the chosen positions (scalar)."""
  grid = int(round(pred.shape[1] ** 0.5))
  if grid * grid != pred.shape[1]:
    raise ValueError(f"{pred.shape[1]} tokens are not a square grid")
  per_token = token_losses(pred, teacher_tokens, loss, beta)
  weights = position_weights(active, grid, positions)
  return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)
