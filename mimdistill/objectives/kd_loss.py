"""DeiT's knowledge-distillation loss (`losses.DistillationLoss` of
facebookresearch/deit, unchanged since distillation was added) and the two
base criteria it is used with.

    loss = base(s_cls, targets)                       type 'none'
    loss = base(s_cls, targets) * (1 - alpha) + kd * alpha   'soft' / 'hard'

  * the base criterion only ever sees the CLS-head logits (the first of the
    student's `(cls, dist)` pair): timm's `SoftTargetCrossEntropy` with
    mixup / label-smoothing targets (`mean_b sum_c -y log_softmax(x)`), or
    plain `CrossEntropyLoss` with integer labels;
  * soft: `kl_div(log_softmax(s / T), log_softmax(t / T), reduction='sum',
    log_target=True) * T^2 / s.numel()`: the divisor is B * C (numel), not
    B;
  * hard: `cross_entropy(s, t.argmax(1))`, mean over the batch (tau unused);
  * `s` is the distillation head's logits (the second of the pair), or the
    one head of a single-head student (as G2SD and DeiT's `ViT` models
    allow); the teacher logits carry no gradient.

Everything is computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

KD_TYPES = ("none", "soft", "hard")


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm `SoftTargetCrossEntropy`: `mean_b sum_c -y[b, c] log_softmax(x)[b, c]`."""
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`torch.nn.CrossEntropyLoss()` on integer labels: mean over the batch."""
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  )


def soft_distillation(student: jax.Array, teacher: jax.Array, tau: float) -> jax.Array:
  """DeiT's soft term: `T^2 / (B * C) * sum p_t (log p_t - log p_s)` with
  `p = softmax(. / T)`."""
  log_s = jax.nn.log_softmax(student.astype(jnp.float32) / tau, axis=-1)
  log_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / tau, axis=-1)
  per_example = optax.losses.kl_divergence_with_log_targets(log_s, log_t)
  return jnp.sum(per_example) * (tau * tau) / student.size


def hard_distillation(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """DeiT's hard term: cross-entropy against the teacher's argmax."""
  return cross_entropy(student, jnp.argmax(teacher, axis=-1))


def split_outputs(outputs) -> tuple[jax.Array, jax.Array]:
  """`(cls, dist)` logits of a two-head student, `(x, x)` of a single head."""
  if isinstance(outputs, (tuple, list)):
    cls, dist = outputs
    return cls, dist
  return outputs, outputs


def distillation_loss(
  outputs,
  targets: jax.Array,
  teacher_logits: jax.Array | None,
  *,
  base: Callable[[jax.Array, jax.Array], jax.Array],
  kd_type: str,
  alpha: float,
  tau: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DeiT `DistillationLoss(base, teacher, kd_type, alpha, tau)` on the
  student's `outputs` (logits, or the `(cls, dist)` pair) and the teacher's
  logits on the same images. Returns the loss and its parts (`base`, and
  `kd` for 'soft' / 'hard')."""
  if kd_type not in KD_TYPES:
    raise ValueError(f"kd.type={kd_type!r} is not one of {KD_TYPES}")
  cls, dist = split_outputs(outputs)
  base_loss = base(cls, targets)
  if kd_type == "none":
    return base_loss, {"base": base_loss}
  if teacher_logits is None:
    raise ValueError(f"kd.type={kd_type!r} needs the teacher's logits")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  if kd_type == "soft":
    kd = soft_distillation(dist, teacher_logits, tau)
  else:
    kd = hard_distillation(dist, teacher_logits)
  loss = base_loss * (1 - alpha) + kd * alpha
  return loss, {"base": base_loss, "kd": kd}
