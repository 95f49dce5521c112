"""The one training loop every stage uses.

A stage describes itself as a `Task` (how to initialise variables, the loss,
the optimizer, extra non-trained inputs such as a teacher, weights loaded
from an earlier stage) and hands it to `train`, which owns everything else:
Orbax checkpoints with the data-iterator state, resume, metrics, NaN/Inf
handling, evaluation.

`prepare(task, mesh, rng)` is the set-up every runner shares (the loop, the
benchmark, the scale tests): the abstract state and its shardings, the
jitted update step (explicit in/out shardings, state donated), the placed
inputs and the batch placement. The update is a pure function
`update(state, batch, inputs) -> (state, metrics)`.

Weights are never constants of a compiled program: the fresh state comes
from `jax.jit(init, out_shardings=...)` on a key alone, and weights loaded
on the host (`Task.pretrained`, a teacher in `Task.inputs`) are placed with
their shardings and passed as arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mimdistill import workdir as workdir_lib
from mimdistill.paths import as_path
from mimdistill.training import checkpoints as ckpt_lib
from mimdistill.training import sharding as shard_lib
from mimdistill.training.metrics import MetricWriter, to_host
from mimdistill.training.state import TrainState
from mimdistill.workdir_lock import WorkdirLock

PyTree = Any
log = logging.getLogger("mimdistill")

# loss_fn(params, model_state, batch, rng, inputs) -> (loss, (metrics, model_state))
# `model_state` holds the model's non-param collections ({'fixed': ...,
# 'batch_stats': ...}); a loss that changes none returns the one it got.
LossFn = Callable[[PyTree, PyTree, dict, jax.Array, PyTree], tuple[jax.Array, tuple[dict, PyTree]]]


@dataclasses.dataclass
class Task:
  """What a stage plugs into the shared loop."""

  name: str
  # rng -> {'params': ..., <other collections>: ...}: a random init, pure.
  init_variables: Callable[[jax.Array], dict]
  loss_fn: LossFn
  make_optimizer: Callable[[PyTree, optax.Schedule], optax.GradientTransformation]
  schedule: optax.Schedule
  total_steps: int
  images_per_step: int
  # Non-trained inputs to the loss (e.g. frozen teacher variables): sharded
  # like params, passed to every step, never differentiated, never saved.
  inputs: PyTree = None
  # Host (numpy) subtrees of params from an earlier stage, `{top-level
  # name: subtree}`: replace the random init of those subtrees in a fresh
  # run (a resume restores everything from its checkpoint instead). A
  # subtree may be partial: leaves it lacks keep their random init.
  pretrained: dict | None = None
  # The same for the non-param collections, `{collection: {name: subtree}}`
  # (e.g. BatchNorm statistics of a whole imported model).
  pretrained_state: dict | None = None
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
  # Micro-steps per optimizer update (the optimizer accumulates them); only
  # the logged lr needs it here.
  accumulate_steps: int = 1


@dataclasses.dataclass
class LoopConfig:
  seed: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpoints: bool = True
  eval_every: int = 0  # 0: evaluate at the end only


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  metrics: dict  # what final_metrics.json holds: last train metrics, eval_*


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
      return task.loss_fn(params, state.model_state, batch, rng, inputs)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    # A finite loss with an overflowing gradient would still write NaN params.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
      grads, model_state = operands
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), model_state, opt_state

    # A non-finite step leaves the state untouched (the host stops the run at
    # its next check), so what gets checkpointed is always a good state. A
    # branch, not a per-leaf select: `finite` needs every gradient, and a
    # select would hold the new params and moments beside the old ones until
    # the norm is known (XLA temp of b_from_l at batch 2: 992 MB with the
    # select, 574 MB with the branch).
    params, model_state, opt_state = jax.lax.cond(
      finite,
      apply,
      lambda _: (state.params, state.model_state, state.opt_state),
      (grads, model_state),
    )
    new_state = state.replace(
      step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state
    )
    if task.ema_decay:
      new_state = new_state.replace(
        ema=optax.incremental_update(new_state.params, state.ema, 1.0 - task.ema_decay)
      )
    metrics = dict(
      metrics,
      loss=loss,
      lr=applied_lr(task, state.step),
      grad_norm=grad_norm,
      nonfinite=(~finite).astype(jnp.int32),
    )
    return new_state, metrics

  return update


def applied_lr(task: Task, step):
  """The lr the optimizer applies at loop step `step`: with gradient
  accumulation over k micro-steps, update j (made at micro-step j*k + k-1)
  uses the schedule at micro-step j*k (MAE's engine)."""
  k = task.accumulate_steps
  return task.schedule(step // k * k) if k > 1 else task.schedule(step)


def make_init_state(task: Task) -> Callable[[jax.Array], TrainState]:
  """`init_state(rng)`: fresh variables and optimizer state (pure; jit it)."""

  def init_state(rng) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = dict(task.init_variables(init_rng))
    params = variables.pop("params")
    tx = task.make_optimizer(params, task.schedule)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=variables,
      opt_state=tx.init(params),
      rng=state_rng,
      ema=params if task.ema_decay else None,
    )

  return init_state


@dataclasses.dataclass
class Prepared:
  """What a run of `task` on `mesh` needs, set up once (see `prepare`)."""

  task: Task
  mesh: Any
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_sharding: TrainState
  tx: optax.GradientTransformation
  inputs: PyTree  # task.inputs, placed
  inputs_sharding: PyTree
  update: Callable  # jitted, donated: (state, batch, inputs) -> (state, metrics)
  rng: jax.Array

  def init_state(self) -> TrainState:
    """A fresh, sharded state: the jitted random init, then the task's
    pretrained subtrees placed with their shardings in place of the random
    ones (optax's initial states do not depend on the params' values)."""
    state = jax.jit(make_init_state(self.task), out_shardings=self.state_sharding)(self.rng)
    if not self.task.pretrained and not self.task.pretrained_state:
      return state

    def place(tree, given, shardings):
      # Copies (may_alias=False): the state is donated to the update step, so
      # no buffer may be shared with host numpy or with another state field.
      out = dict(tree)
      for name, subtree in given.items():
        if isinstance(subtree, dict) and isinstance(out[name], dict):
          out[name] = place(out[name], subtree, shardings[name])
        else:
          out[name] = jax.device_put(subtree, shardings[name], may_alias=False)
      return out

    params = self.task.pretrained or {}
    p_sharding = self.state_sharding.params
    return state.replace(
      params=place(state.params, params, p_sharding),
      ema=place(state.ema, params, p_sharding) if self.task.ema_decay else None,
      model_state=place(
        state.model_state, self.task.pretrained_state or {}, self.state_sharding.model_state
      ),
    )

  def place_batch(self, host_batch: dict) -> dict:
    """This process's rows of a batch -> global arrays on the batch sharding."""
    sharding = shard_lib.batch_sharding(self.mesh)
    return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch
    )


def prepare(task: Task, mesh, rng: jax.Array) -> Prepared:
  """Shardings, the jitted update and the placed inputs of `task` on `mesh`.

  Params, optimizer state and inputs are split over the mesh's `fsdp` axis
  when it has more than one device; step counter and key are replicated.
  """
  shard_lib.check_batch(task.images_per_step, mesh)
  fsdp = shard_lib.fsdp_size(mesh) > 1
  abstract = jax.eval_shape(make_init_state(task), rng)
  sharding = shard_lib.tree_shardings(abstract, mesh, fsdp=fsdp)
  sharding = sharding.replace(step=shard_lib.replicated(mesh), rng=shard_lib.replicated(mesh))
  abstract = jax.tree_util.tree_map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sharding
  )
  tx = task.make_optimizer(abstract.params, task.schedule)
  inputs_sharding = shard_lib.tree_shardings(task.inputs, mesh, fsdp=fsdp)
  inputs = jax.device_put(task.inputs, inputs_sharding)
  update = jax.jit(
    build_update(task, tx),
    in_shardings=(sharding, shard_lib.batch_sharding(mesh), inputs_sharding),
    out_shardings=(sharding, shard_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
  return Prepared(task, mesh, abstract, sharding, tx, inputs, inputs_sharding, update, rng)


def check_workdir(workdir, config_dict: dict, signature: dict):
  """Refuses a workdir whose checkpoints belong to another model, or to
  another run of it (another dataset, batch size, recipe: anything but the
  fields of `workdir.RESUMABLE` and the run's length), then records the
  config."""
  saved = workdir_lib.read_json(workdir, workdir_lib.CONFIG)
  if saved and workdir_lib.has_checkpoints(workdir):
    old = saved.get("signature", {})
    diff = {k: (old.get(k), v) for k, v in signature.items() if old.get(k) != v}
    if diff:
      raise ValueError(
        f"workdir {workdir} holds checkpoints of a different model "
        f"({', '.join(f'{k}: {a} there vs {b} now' for k, (a, b) in diff.items())}); "
        "use a new --workdir or the same model config"
      )
    changes = workdir_lib.config_changes(
      saved.get("config") or {},
      config_dict,
      ignore=workdir_lib.RESUMABLE + workdir_lib.LENGTH,
    )
    if changes and saved.get("config"):
      raise ValueError(
        f"workdir {workdir} holds checkpoints of a run with another config "
        f"({workdir_lib.describe_changes(changes)}); resuming would mix the two: use the saved "
        "settings to resume, or a new --workdir for the new ones"
      )
  workdir_lib.write_json(
    workdir, workdir_lib.CONFIG, {"config": config_dict, "signature": signature}
  )


@jax.jit
def _max_abs_of_leaves(leaves: list) -> jax.Array:
  # One program for the whole tree: per-leaf eager ops compiled one
  # reduction per distinct leaf shape (24 compiles in the quickstart).
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves]))


def _max_abs(tree) -> float:
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if x.size]
  return float(_max_abs_of_leaves(leaves)) if leaves else 0.0


def train(
  task: Task,
  data,
  workdir,
  loop: LoopConfig,
  *,
  mesh,
  config_dict: dict | None = None,
  lineage: dict | None = None,
  on_log: Callable[[int, dict], None] | None = None,
) -> TrainResult:
  """Runs (or resumes) `task` to `task.total_steps` on `mesh`, holding the
  workdir's lock for the whole run.

  `data` is a `mimdistill.data` train `BatchIterator` (global batches; its
  `grain_iterator` position is checkpointed with the state). Returns the
  final state and the metrics written to `final_metrics.json`.
  """
  workdir = as_path(workdir)
  with WorkdirLock(workdir):
    return _train(task, data, workdir, loop, mesh, config_dict, lineage, on_log)


def _train(task, data, workdir, loop, mesh, config_dict, lineage, on_log) -> TrainResult:
  check_workdir(workdir, config_dict or {}, task.signature)
  if lineage is not None:
    workdir_lib.write_json(workdir, workdir_lib.LINEAGE, lineage)

  # -- state: init or restore -------------------------------------------------
  prep = prepare(task, mesh, jax.random.PRNGKey(loop.seed))
  checkpointer = ckpt_lib.Checkpointer(
    workdir,
    every_steps=loop.checkpoint_every,
    keep=loop.keep_checkpoints,
    async_save=loop.async_checkpoints,
  )
  restored = checkpointer.restore_latest(prep.abstract_state, data.grain_iterator)
  if restored is not None:
    start, state = restored
    log.info("resumed %s from step %d of %s", task.name, start, workdir)
  else:
    start = 0
    state = prep.init_state()
  # The checkpoint a NaN/Inf stop leaves: (step, its logged loss).
  kept = (start, None) if restored is not None else None

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
      state, metrics = prep.update(state, batch, prep.inputs)
      nonfinite = nonfinite + metrics["nonfinite"]
      done = step + 1
      is_last = done == task.total_steps
      wants_save = is_last or done % loop.checkpoint_every == 0
      if done % loop.log_every == 0 or is_last or wants_save:
        host = to_host(metrics)
        if int(nonfinite):
          raise NonFiniteLossError(_nonfinite_message(task, done, host, kept, checkpointer, loop))
        host.pop("nonfinite")
        rate = writer.progress(done, task.images_per_step, loss=host["loss"])
        host["img_per_s"] = rate
        writer.write(done, host)
        last_metrics = host
        if on_log:
          on_log(done, host)
      if wants_save:
        if not math.isfinite(_max_abs(state.params)):
          raise NonFiniteLossError(
            _nonfinite_message(task, done, last_metrics, kept, checkpointer, loop, params=True)
          )
        checkpointer.save(done, state, data.grain_iterator, force=is_last)
        kept = (done, last_metrics.get("loss"))
      if task.evaluate is not None and (
        is_last or (loop.eval_every and done % loop.eval_every == 0)
      ):
        eval_metrics = task.evaluate(state)
        writer.write(done, eval_metrics, prefix="eval")
        log.info("%s step %d eval %s", task.name, done, eval_metrics)
        best.save(
          done,
          args=ocp.args.Composite(
            params=ocp.args.StandardSave({"params": state.params, "model_state": state.model_state})
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
  previous = workdir_lib.read_json(workdir, workdir_lib.FINAL_METRICS) or {}
  if start == task.total_steps and previous:
    record = {**previous, **{k: v for k, v in record.items() if k.startswith("eval_")}}
  workdir_lib.write_json(workdir, workdir_lib.FINAL_METRICS, record)
  return TrainResult(state, record)


def _nonfinite_message(task, done, host, kept, checkpointer, loop, params=False) -> str:
  what = (
    f"the params became NaN/Inf by step {done} (last logged loss {host.get('loss')})"
    if params
    else f"the loss became NaN/Inf at or before step {done} (last value {host.get('loss')})"
  )
  if kept is None:
    where = (
      f"no checkpoint was saved before it (the first is at step {loop.checkpoint_every}, "
      "checkpoint_every)"
    )
  else:
    loss = f", loss {kept[1]:.4g} there" if kept[1] is not None else ""
    where = (
      f"the newest checkpoint, step {kept[0]}{loss}, is kept in {checkpointer.directory} and "
      "nothing after it was saved"
    )
  return (
    f"{task.name}: {what}; stopped: {where}. Lower the learning rate, enable "
    "optimizer.clip_grad_norm or check the data, then rerun (it resumes from that checkpoint)."
  )
