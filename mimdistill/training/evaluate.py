"""Classification evaluation on padded, masked eval batches.

The eval pipeline pads its last batch and marks real examples with
`mask = 1`, so sums of `mask`-weighted correct counts give exact top-1/top-5
over the split, whatever the number of devices or hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def confusion_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int):
  """`(C, C)` int32 counts of (true label, top-1 prediction) over real examples."""
  pred = jnp.argmax(logits, axis=-1)
  rows = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * mask.astype(jnp.int32)[:, None]
  return rows.T @ jax.nn.one_hot(pred, num_classes, dtype=jnp.int32)


class Evaluator:
  """`evaluate(variables)` over one full pass of `eval_data` (a Pipeline).

  The accumulator lives on the mesh, replicated, from the first batch on, so
  the eval step compiles once (`compiles` counts it); with `num_classes` the
  same pass also counts the confusion matrix (`last_confusion`, host numpy),
  so the stage's picture needs no second pass.
  """

  def __init__(self, apply_fn, eval_data, *, num_classes: int | None = None):
    self.eval_data = eval_data
    self.num_classes = num_classes
    self.last_confusion = None
    mesh = eval_data.mesh
    self._replicated = None if mesh is None else NamedSharding(mesh, P())

    def step(variables, batch, acc):
      logits = apply_fn(variables, batch["image"])
      sums = batch_sums(logits, batch["label"], batch["mask"])
      if num_classes:
        sums["confusion"] = confusion_sums(logits, batch["label"], batch["mask"], num_classes)
      return jax.tree_util.tree_map(jnp.add, acc, sums)

    self._step = jax.jit(step, out_shardings=self._replicated, donate_argnums=(2,))

  @property
  def compiles(self) -> int:
    return self._step._cache_size()

  def _zeros(self):
    acc = {k: jnp.zeros((), jnp.float32) for k in ("correct1", "correct5", "loss_sum", "count")}
    if self.num_classes:
      acc["confusion"] = jnp.zeros((self.num_classes,) * 2, jnp.int32)
    return acc if self._replicated is None else jax.device_put(acc, self._replicated)

  def __call__(self, variables) -> dict[str, float]:
    acc = self._zeros()
    for batch in iter(self.eval_data):
      acc = self._step(variables, batch, acc)
    acc = jax.device_get(acc)
    if self.num_classes:
      self.last_confusion = np.asarray(acc.pop("confusion"), np.int64)
    acc = {k: float(v) for k, v in acc.items()}
    n = max(acc["count"], 1.0)
    return {
      "top1": acc["correct1"] / n,
      "top5": acc["correct5"] / n,
      "loss": acc["loss_sum"] / n,
      "count": acc["count"],
    }


def make_evaluator(apply_fn, eval_data, *, num_classes: int | None = None) -> Evaluator:
  return Evaluator(apply_fn, eval_data, num_classes=num_classes)
