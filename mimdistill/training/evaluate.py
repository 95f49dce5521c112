"""Classification evaluation on padded, masked eval batches.

The eval pipeline pads its last batch and marks real examples with
`mask = 1`, so sums of `mask`-weighted correct counts give exact top-1/top-5
over the split, whatever the number of devices or hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
  """Mask-weighted sums of correct@1, correct@5, cross-entropy and count."""
  logits = logits.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = top == labels[:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
    "correct1": jnp.sum(hit[:, 0] * mask),
    "correct5": jnp.sum(jnp.any(hit, axis=1) * mask),
    "loss_sum": jnp.sum(ce * mask),
    "count": jnp.sum(mask),
  }


def make_evaluator(
  apply_fn: Callable[[PyTree, jax.Array], jax.Array], eval_data, variables_sharding=None
) -> Callable[[PyTree], dict[str, float]]:
  """`evaluate(variables)` over one full pass of `eval_data` (a Pipeline)."""

  @jax.jit
  def step(variables, batch, acc):
    sums = batch_sums(apply_fn(variables, batch["image"]), batch["label"], batch["mask"])
    return jax.tree_util.tree_map(jnp.add, acc, sums)

  def evaluate(variables) -> dict[str, float]:
    acc = {k: jnp.zeros((), jnp.float32) for k in ("correct1", "correct5", "loss_sum", "count")}
    for batch in iter(eval_data):
      acc = step(variables, batch, acc)
    acc = {k: float(v) for k, v in jax.device_get(acc).items()}
    n = max(acc["count"], 1.0)
    return {
      "top1": acc["correct1"] / n,
      "top5": acc["correct5"] / n,
      "loss": acc["loss_sum"] / n,
      "count": acc["count"],
    }

  return evaluate
