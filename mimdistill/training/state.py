"""The train state: one pytree holding everything a resume needs."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: PyTree  # trained
  # The model's non-param collections, `{collection: tree}` (the fixed
  # sin-cos embeddings under 'fixed', BatchNorm statistics under
  # 'batch_stats'); a loss returns the next one.
  model_state: PyTree
  opt_state: PyTree
  rng: jax.Array  # base key; step keys are fold_in(rng, step)
  ema: PyTree = None  # exponential moving average of params, if enabled
