"""A fusion boundary on the residual stream's gradient, for XLA:CPU.

In the backward pass of a pre-norm Transformer the gradient of the residual
stream after block l is the gradient after block l+1 plus the two branch
gradients (LayerNorm backward on the dot outputs): a chain of cheap
elementwise ops. XLA:CPU's instruction fusion duplicates cheap producers
into every consumer, so each block's consumers (the transposed copies that
feed the weight-gradient dots, the drop-path select) re-run the chain of
every later block from the materialised dot outputs: fusions with 14
operands per later block (170 at depth 12), quadratic memory traffic in the
depth. On the s_from_b step (224 px, batch 4) those fusions took about 0.3 s
of the 5 s of CPU time per step.

`residual_barrier` is the identity whose backward, on CPU only, passes the
gradient through a `lax.cond` that XLA can neither fold nor fuse across, so
the gradient is materialised once per block. On GPU and TPU it is the
identity both ways (a conditional costs a predicate round trip there, and
their fusion passes bound fusion size). `optimization_barrier` does not do
this: XLA:CPU expands it before fusion.

The gradient's value is unchanged: both branches return it (one multiplies
by 1.0, exact for every float, so the two branches stay distinct
computations the conditional simplifier keeps). On the plain encoder it is
the same bit for bit; where a block's output has a second reader (the taps
of a segmentation backbone) that reader's cotangent is added to the next
block's before the barrier instead of in one chain with it, a different
summation order (1.5e-7 relative on a 4-block test encoder). With the batch sharded over several CPU
devices the predicate's one element is broadcast from the device that holds
it, one scalar per block and step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _materialise(g: jax.Array) -> jax.Array:
  # The predicate reads the gradient, so XLA cannot fold the conditional.
  unknown = jnp.isnan(g.reshape(-1)[0])
  return jax.lax.cond(unknown, lambda y: y, lambda y: y * jnp.ones((), y.dtype), g)


@jax.custom_vjp
def residual_barrier(x: jax.Array) -> jax.Array:
  """Identity; its gradient is materialised (on CPU) before it flows on."""
  return x


def _forward(x):
  return x, None


def _backward(_, g):
  return (jax.lax.platform_dependent(g, cpu=_materialise, default=lambda y: y),)


residual_barrier.defvjp(_forward, _backward)
