"""Distillation targets of the TinyMIM paper's ablations (Tables 5-7, 10, 12).

Every loss here is computed in float32 whatever the compute dtype.

  * relations (the TinyMIM default): `relation_target_losses` with a relation
    set ('qk_vv' default, 'qq_kk_vv') and with softmax (KL(teacher||student)
    per query row, `objectives.relations`) or without softmax (regression on
    the raw scaled logits `A B^T / sqrt(d_R)`: MSE by default, smooth-L1 as an
    option; averaged over batch, heads, queries and keys);
  * class token: `cls_kl`, KL(softmax(teacher CLS) || softmax(W student CLS))
    over the teacher's feature channels, averaged over the batch;
  * features: `feature_loss`, smooth-L1 (beta 2.0) between the linearly
    projected student feature and the teacher feature whitened by a LayerNorm
    without affine parameters (eps 1e-6), averaged over every element.

Which feature a 'feature type' names is listed in `FEATURE_TYPES`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mimdistill.objectives.relations import RELATION_SETS, kl_rows, relation_losses, relations

TARGETS = ("relation", "cls", "feature")

# Feature types of feature distillation (paper Table 10), taken at the
# teacher's target block and the student's last block:
FEATURE_TYPES = {
  "output": "block output (the encoder's output after that block; the "
  "final norm is included only when it is the last block)",
  "attn": "attention branch output, before the residual add",
  "attn_residual": "x + attention, after the residual add",
  "ffn": "MLP branch output, before the residual add",
  "ffn_residual": "x + attention + MLP, after the residual add "
  "(the block output without the final norm)",
  "q": "queries of the fused qkv projection (all heads, D channels)",
  "k": "keys of the fused qkv projection",
  "v": "values of the fused qkv projection",
}

RAW_RELATION_LOSSES = ("mse", "smooth_l1")


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
  """torch `smooth_l1_loss(reduction='mean')`: 0.5 x^2 / beta if |x| < beta,
  else |x| - 0.5 beta, i.e. optax's Huber loss with delta = beta, over beta."""
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  if beta == 0:
    return jnp.mean(jnp.abs(pred - target))
  return jnp.mean(optax.losses.huber_loss(pred, target, delta=beta)) / beta


def whiten(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over channels without affine parameters, in float32 (the
  variance taken in two passes, as torch's LayerNorm)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
  return jax.nn.standardize(x, axis=-1, mean=mean, variance=var, epsilon=eps)


def feature_loss(
  student_projected: jax.Array, teacher_feature: jax.Array, beta: float = 2.0
) -> jax.Array:
  """Smooth-L1 vs the whitened teacher feature (shapes must agree)."""
  if student_projected.shape != teacher_feature.shape:
    raise ValueError(
      f"projected student feature {student_projected.shape} vs "
      f"teacher feature {teacher_feature.shape}"
    )
  return smooth_l1(student_projected, whiten(teacher_feature), beta)


def cls_kl(teacher_cls: jax.Array, student_cls_projected: jax.Array) -> jax.Array:
  """KL(softmax(teacher) || softmax(student)) over channels, mean over batch."""
  if teacher_cls.shape != student_cls_projected.shape:
    raise ValueError(
      f"projected student CLS {student_cls_projected.shape} vs teacher CLS {teacher_cls.shape}"
    )
  return kl_rows(teacher_cls, student_cls_projected)


def raw_relation_loss(
  teacher_logits: jax.Array, student_logits: jax.Array, kind: str = "mse", beta: float = 2.0
) -> jax.Array:
  """Regression on raw (pre-softmax) relation logits, mean over elements."""
  t = teacher_logits.astype(jnp.float32)
  s = student_logits.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean((s - t) ** 2)
  if kind == "smooth_l1":
    return smooth_l1(s, t, beta)
  raise ValueError(f"raw relation loss {kind!r} is not one of {RAW_RELATION_LOSSES}")


def relation_target_losses(
  teacher_qkv,
  student_qkv,
  *,
  relation_set: str = "qk_vv",
  softmax: bool = True,
  raw_loss: str = "mse",
  beta: float = 2.0,
) -> dict[str, jax.Array]:
  """Per-relation losses (`{'qk': .., 'vv': ..}`), summed 1:1 by the caller.

  `teacher_qkv`, `student_qkv`: (q, k, v) each `(B, R, N, D/R)`.
  """
  if relation_set not in RELATION_SETS:
    raise ValueError(f"relation_set={relation_set!r} is not one of {sorted(RELATION_SETS)}")
  pairs = RELATION_SETS[relation_set]
  t_rel = relations(teacher_qkv, pairs)
  s_rel = relations(student_qkv, pairs)
  if softmax:
    return relation_losses(t_rel, s_rel)
  for name in t_rel:
    if t_rel[name].shape != s_rel[name].shape:
      raise ValueError(
        f"relation {name}: teacher {t_rel[name].shape} vs student {s_rel[name].shape}"
      )
  return {name: raw_relation_loss(t_rel[name], s_rel[name], raw_loss, beta) for name in t_rel}
