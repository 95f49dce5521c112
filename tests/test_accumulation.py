"""Gradient accumulation keeps the official recipe: the lr follows the
effective batch and the schedule advances by micro-batches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = jax.tree_util.tree_map(jnp.add, params, updates)
  return params


def test_k_micro_steps_equal_one_update_on_their_mean_gradient():
  k, updates = 2, 3
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  rng = np.random.default_rng(0)
  micro = [
    jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    for _ in range(k * updates)
  ]
  schedule = schedules.warmup_cosine(1e-2, 0.0, k * updates, k)
  accumulated = _run(opt_lib.adamw(params, schedule, accumulate_steps=k), params, micro)
  # Update j sees the mean of its k gradients and the lr of micro-step j*k.
  means = [
    jax.tree_util.tree_map(lambda *g: sum(g) / k, *micro[j * k : (j + 1) * k])
    for j in range(updates)
  ]
  reference = _run(opt_lib.adamw(params, lambda c: schedule(c * k)), params, means)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), accumulated, reference
  )


def test_peak_lr_scales_with_the_effective_batch():
  c = ml_collections.ConfigDict(
    {"lr": 0.0, "base_lr": 1.5e-4, "batch_size": 1024, "optimizer": {"accumulate_steps": 4}}
  )
  assert run_config.peak_lr(c) == 1.5e-4 * 4096 / 256
  c.optimizer.accumulate_steps = 1
  assert run_config.peak_lr(c) == 1.5e-4 * 1024 / 256
  c.lr = 3e-3
  assert run_config.peak_lr(c) == 3e-3
