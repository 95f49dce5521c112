"""TinyMIM*-T's extra layer, `conv1x1` in the official
`Segmentation/TinyMIMstar-T/backbone/mae.py`: `LayerNorm(eps=1e-5) ->
Linear(D -> fc_dim) -> GELU` (exact erf GELU) on every token, the CLS and
distillation tokens included, after the last block. Its LayerNorm keeps
PyTorch's default eps 1e-5, unlike the blocks' 1e-6; its Linear is
initialised like the rest of that backbone (timm `_init_weights`:
trunc-normal std 0.02, bias 0).

One definition for every model that carries it (the segmentation backbone,
the classifier): a parent builds the two sub-modules in its `setup` under the
attribute names `conv1x1_0` and `conv1x1_1` (the official `conv1x1.0`,
`conv1x1.1`) and calls `apply`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

STAR_FC_DIM = 1280  # the official width of the extra layer
_trunc02 = nn.initializers.truncated_normal(0.02)


def modules(fc_dim: int, dtype: Any) -> tuple[nn.LayerNorm, nn.Dense]:
  """`(conv1x1_0, conv1x1_1)`: the LayerNorm and the Linear, to be assigned
  to attributes of those names in the parent's `setup`."""
  return (
    nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype),
    nn.Dense(int(fc_dim), kernel_init=_trunc02, dtype=dtype),
  )


def apply(norm: nn.LayerNorm, dense: nn.Dense, tokens: jax.Array) -> jax.Array:
  """`(B, N, D) -> (B, N, fc_dim)`."""
  return nn.gelu(dense(norm(tokens)), approximate=False)
