"""The one training loop every stage uses.

A stage describes itself as a `Task` (how to initialise variables, the loss,
which params are frozen, extra non-trained inputs such as a teacher) and
hands it to `train`, which owns everything else: mesh and shardings, the
jitted update step, Orbax checkpoints with the data-iterator state, resume,
metrics, NaN/Inf handling.

The update step is a pure function `update(state, batch, inputs)` compiled
once with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mimdistill.paths import as_path
from mimdistill.training import checkpoints as ckpt_lib
from mimdistill.training import sharding as shard_lib
from mimdistill.training.metrics import MetricWriter, to_host
from mimdistill.training.state import TrainState

PyTree = Any
log = logging.getLogger("mimdistill")

# loss_fn(params, fixed, batch, rng, inputs) -> (scalar loss, {name: scalar});
# the aux dict may carry the next `fixed` under NEW_FIXED (e.g. BatchNorm
# running statistics), which then replaces the state's.
NEW_FIXED = "__new_fixed__"
LossFn = Callable[[PyTree, PyTree, dict, jax.Array, PyTree], tuple[jax.Array, dict]]


@dataclasses.dataclass
class Task:
  """What a stage plugs into the shared loop."""

  name: str
  init_variables: Callable[[jax.Array], dict]  # rng -> {'params', 'fixed'?}
  loss_fn: LossFn
  make_optimizer: Callable[[PyTree, optax.Schedule], optax.GradientTransformation]
  schedule: optax.Schedule
  total_steps: int
  images_per_step: int
  # Non-trained inputs to the loss (e.g. frozen teacher variables): sharded
  # like params, passed to every step, never differentiated, never saved.
  inputs: PyTree = None
  # Identity of the trained model, compared with a workdir's config.json so a
  # run never resumes another model's checkpoints.
  signature: dict = dataclasses.field(default_factory=dict)
  # Optional `evaluate(state) -> {'top1': ..., ...}`, run every
  # `LoopConfig.eval_every` steps and at the end; the best state by
  # `best_metric` is kept in `<workdir>/best`.
  evaluate: Callable[[TrainState], dict] | None = None
  best_metric: str = "top1"
  # > 0 keeps `state.ema = d * ema + (1 - d) * params` after every update.
  ema_decay: float = 0.0


@dataclasses.dataclass
class LoopConfig:
  seed: int = 0
  fsdp: int = 1
  log_every: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  eval_every: int = 0  # 0: evaluate at the end only


class NonFiniteLossError(FloatingPointError):
  pass


def _step_key(state: TrainState) -> jax.Array:
  # Keys depend only on (seed, step): the same on 1 or 1000 devices and
  # across restarts.
  return jax.random.fold_in(state.rng, state.step)


def build_update(task: Task, tx: optax.GradientTransformation):
  """The pure update step (not yet jitted)."""

  def update(state: TrainState, batch: dict, inputs: PyTree):
    rng = _step_key(state)

    def loss_of(params):
      return task.loss_fn(params, state.fixed, batch, rng, inputs)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    metrics = dict(metrics)
    fixed = metrics.pop(NEW_FIXED, state.fixed)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss)
    # A non-finite loss leaves the state untouched (the host stops the run at
    # its next check), so what gets checkpointed is always a good state.
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      fixed=keep(fixed, state.fixed),
      opt_state=keep(opt_state, state.opt_state),
    )
    if task.ema_decay:
      new_state = new_state.replace(
        ema=optax.incremental_update(new_state.params, state.ema, 1.0 - task.ema_decay)
      )
    metrics = dict(
      metrics,
      loss=loss,
      lr=task.schedule(state.step),
      grad_norm=optax.tree.norm(grads),
      nonfinite=(~finite).astype(jnp.int32),
    )
    return new_state, metrics

  return update


def make_init_state(task: Task) -> Callable[[jax.Array], TrainState]:
  """`init_state(rng)`: fresh variables and optimizer state (pure; jit it)."""

  def init_state(rng) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = task.init_variables(init_rng)
    params = variables["params"]
    tx = task.make_optimizer(params, task.schedule)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      fixed=variables.get("fixed", {}),
      opt_state=tx.init(params),
      rng=state_rng,
      ema=params if task.ema_decay else None,
    )

  return init_state


def plan_state(task: Task, mesh, fsdp: int, rng: jax.Array):
  """(abstract state, its shardings, optimizer) without allocating anything.

  Params and optimizer state are split over the `fsdp` mesh axis when
  `fsdp > 1`; the step counter and the key are always replicated.
  """
  abstract = jax.eval_shape(make_init_state(task), rng)
  sharding = shard_lib.tree_shardings(abstract, mesh, fsdp=fsdp > 1)
  sharding = sharding.replace(step=shard_lib.replicated(mesh), rng=shard_lib.replicated(mesh))
  return abstract, sharding, task.make_optimizer(abstract.params, task.schedule)


def jit_update(task: Task, tx: optax.GradientTransformation, mesh, state_sharding, inputs_sharding):
  """The jitted update step: explicit in/out shardings, state donated."""
  return jax.jit(
    build_update(task, tx),
    in_shardings=(state_sharding, shard_lib.batch_sharding(mesh), inputs_sharding),
    out_shardings=(state_sharding, shard_lib.replicated(mesh)),
    donate_argnums=(0,),
  )


def check_workdir(workdir, config_dict: dict, signature: dict):
  """Refuses a workdir whose checkpoints belong to another model."""
  saved = ckpt_lib.read_json(workdir, "config.json")
  has_ckpt = ckpt_lib.checkpoint_dir(workdir).is_dir() and any(
    ckpt_lib.checkpoint_dir(workdir).iterdir()
  )
  if saved and has_ckpt:
    old = saved.get("signature", {})
    diff = {k: (old.get(k), v) for k, v in signature.items() if old.get(k) != v}
    if diff:
      raise ValueError(
        f"workdir {workdir} holds checkpoints of a different model "
        f"({', '.join(f'{k}: {a} there vs {b} now' for k, (a, b) in diff.items())}); "
        "use a new --workdir or the same model config"
      )
  ckpt_lib.write_json(workdir, "config.json", {"config": config_dict, "signature": signature})


def train(
  task: Task,
  data,
  workdir,
  loop: LoopConfig,
  config_dict: dict | None = None,
  lineage: dict | None = None,
  mesh=None,
  on_log: Callable[[int, dict], None] | None = None,
) -> TrainState:
  """Runs (or resumes) `task` to `task.total_steps`; returns the final state.

  `data` is a `mimdistill.data` train `BatchIterator` (global batches; its
  `grain_iterator` position is checkpointed with the state).
  """
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.make_mesh(loop.fsdp)
  shard_lib.check_batch(task.images_per_step, mesh)
  check_workdir(workdir, config_dict or {}, task.signature)
  if lineage is not None:
    ckpt_lib.write_json(workdir, "lineage.json", lineage)

  # -- state: abstract shapes, shardings, init or restore ---------------------
  rng = jax.random.PRNGKey(loop.seed)
  abstract, state_sharding, tx = plan_state(task, mesh, loop.fsdp, rng)

  checkpointer = ckpt_lib.Checkpointer(
    workdir,
    every_steps=loop.checkpoint_every,
    keep=loop.keep_checkpoints,
    async_save=loop.async_checkpoints,
  )
  start = checkpointer.latest_step()
  if start is not None:
    target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    state = checkpointer.restore(start, target, data.grain_iterator)
    log.info("resumed %s from step %d of %s", task.name, start, workdir)
  else:
    start = 0
    state = jax.jit(make_init_state(task), out_shardings=state_sharding)(rng)

  inputs_sharding = shard_lib.tree_shardings(task.inputs, mesh, fsdp=loop.fsdp > 1)
  inputs = jax.device_put(task.inputs, inputs_sharding)
  update = jit_update(task, tx, mesh, state_sharding, inputs_sharding)

  # -- the loop ---------------------------------------------------------------
  best = None
  if task.evaluate is not None:
    best = ocp.CheckpointManager(
      workdir / "best",
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[task.best_metric],
        best_mode="max",
        enable_async_checkpointing=False,
      ),
    )
  eval_metrics: dict = {}
  writer = MetricWriter(workdir, task.total_steps, start, desc=task.name)
  data_iter: Iterator = data
  nonfinite = jnp.zeros((), jnp.int32)
  last_metrics: dict = {}
  t_start = time.perf_counter()
  try:
    for step in range(start, task.total_steps):
      batch = next(data_iter)
      state, metrics = update(state, batch, inputs)
      nonfinite = nonfinite + metrics["nonfinite"]
      done = step + 1
      is_last = done == task.total_steps
      wants_save = is_last or done % loop.checkpoint_every == 0
      if done % loop.log_every == 0 or is_last or wants_save:
        host = to_host(metrics)
        if int(nonfinite):
          raise NonFiniteLossError(
            f"{task.name}: the loss became NaN/Inf at or before step {done} "
            f"(last value {host['loss']}); stopped without saving, the last "
            f"good checkpoint in {checkpointer.manager.directory} is kept. "
            "Lower the learning rate, enable clip_grad_norm or check the data."
          )
        host.pop("nonfinite")
        rate = writer.progress(done, task.images_per_step, loss=host["loss"])
        host["img_per_s"] = rate
        writer.write(done, host)
        last_metrics = host
        if on_log:
          on_log(done, host)
      if wants_save:
        checkpointer.save(done, state, data.grain_iterator, force=is_last)
      if task.evaluate is not None and (
        is_last or (loop.eval_every and done % loop.eval_every == 0)
      ):
        eval_metrics = task.evaluate(state)
        writer.write(done, eval_metrics, prefix="eval")
        log.info("%s step %d eval %s", task.name, done, eval_metrics)
        best.save(
          done,
          args=ocp.args.Composite(
            params=ocp.args.StandardSave({"params": state.params, "fixed": state.fixed})
          ),
          metrics=eval_metrics,
        )
    if start == task.total_steps and task.evaluate is not None:
      eval_metrics = task.evaluate(state)  # finished earlier: report again
  finally:
    checkpointer.close()
    best_step = None
    if best is not None:
      best_step = best.best_step()
      best.close()
    writer.close()
  last_metrics["train_seconds"] = time.perf_counter() - t_start
  record = {"step": int(task.total_steps), **last_metrics}
  record.update({f"eval_{k}": v for k, v in eval_metrics.items()})
  if best_step is not None:
    record["best_step"] = int(best_step)
  previous = ckpt_lib.read_json(workdir, "final_metrics.json") or {}
  if start == task.total_steps and previous:
    record = {**previous, **{k: v for k, v in record.items() if k.startswith("eval_")}}
  ckpt_lib.write_json(workdir, "final_metrics.json", record)
  return state
