"""TinyMIM token-relation distillation loss.

A relation is `softmax(A B^T / sqrt(d_R))` over keys, for A, B in {Q, K, V}
split into R heads. The loss per relation is KL(teacher || student) per query
row, summed over keys and averaged over (batch, heads, queries); everything in
float32 with log-softmax, whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

# Pairs of the paper's relation sets: default {Q-K, V-V}; ablation {Q-Q, K-K, V-V}.
RELATION_SETS = {
  "qk_vv": (("q", "k"), ("v", "v")),
  "qq_kk_vv": (("q", "q"), ("k", "k"), ("v", "v")),
}


def relation_logits(a: jax.Array, b: jax.Array) -> jax.Array:
  """`(B, R, N, d)` x `(B, R, N, d)` -> `(B, R, N, N)` scaled logits, float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum("brqd,brkd->brqk", a, b) * (a.shape[-1] ** -0.5)


def relations(
  qkv: Mapping[str, jax.Array] | Sequence[jax.Array],
  pairs: Sequence[tuple[str, str]] = RELATION_SETS["qk_vv"],
) -> dict[str, jax.Array]:
  """Relation logits keyed 'qk', 'vv', ... from q, k, v."""
  if not isinstance(qkv, Mapping):
    qkv = dict(zip("qkv", qkv))
  return {a + b: relation_logits(qkv[a], qkv[b]) for a, b in pairs}


def kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """Mean over leading axes of `sum_j t_j (log t_j - log s_j)`."""
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(optax.losses.kl_divergence_with_log_targets(log_s, log_t))


def relation_losses(
  teacher: Mapping[str, jax.Array], student: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
  """Per-relation KL losses, e.g. `{'qk': ..., 'vv': ...}`."""
  missing = set(teacher) ^ set(student)
  if missing:
    raise ValueError(f"teacher and student relations differ: {sorted(missing)}")
  for name in teacher:
    if teacher[name].shape != student[name].shape:
      raise ValueError(
        f"relation {name}: teacher {teacher[name].shape} vs student "
        f"{student[name].shape}; teacher and student need the same number of "
        "tokens (image/patch size) and relation heads"
      )
  return {name: kl_rows(teacher[name], student[name]) for name in teacher}
