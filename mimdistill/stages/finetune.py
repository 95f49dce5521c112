"""Stage 3: fine-tuning (MAE `main_finetune.py`) or linear probing
(`main_linprobe.py`) of a pre-trained or distilled encoder.

Reads top to bottom:
  1. `validate`: config checks that need no checkpoint and no data;
  2. `build_model`: a `ViTClassifier` with a learnable position embedding,
     the head count of *this* config (distillation may have used another);
  3. `init_from_source`: the encoder from a stage-1/2 workdir or a `.pth`,
     checked against the model, position embedding resized bicubically when
     the resolution differs; a head is kept only if its shape fits;
  4. `build_task`: soft-target cross-entropy (mixup/cutmix + label smoothing
     from the data pipeline), AdamW with layer-wise lr decay and the official
     no-weight-decay set (linear probe: LARS, encoder frozen);
  5. `run`: data, the shared loop with periodic eval (best kept), summary.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mimdistill.data import input_pipeline, sources
from mimdistill.interop.encoder_source import read_encoder, shape_table
from mimdistill.models import zoo
from mimdistill.models.classifier import ViTClassifier
from mimdistill.models.pos_embed import resize_pos_embed, sincos_2d
from mimdistill.models.vit import drop_path_rates
from mimdistill.paths import as_path
from mimdistill.training import checkpoints as ckpt_lib
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib
from mimdistill.training.evaluate import make_evaluator

log = logging.getLogger("mimdistill")

# MAE main_finetune: model.no_weight_decay() = {pos_embed, cls_token}.
NO_DECAY = ("pos_embed", "cls_token")


# -----------------------------------------------------------------------------
# 1. Validation
# -----------------------------------------------------------------------------
def validate(config: ml_collections.ConfigDict) -> None:
  spec = zoo.resolve(config.model)
  if spec.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={spec.image_size} differs from "
      f"data.image_size={config.data.image_size}; set both alike"
    )
  if config.mode not in ("finetune", "linprobe"):
    raise ValueError(f"mode={config.mode!r}: use 'finetune' or 'linprobe'")
  if config.mode == "linprobe" and not config.init.source:
    raise ValueError(
      "linear probing needs a pre-trained encoder: set --config.init.source=<workdir or .pth>"
    )
  sources.check_available(config.data.name, config.data.get("data_dir"))
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))
  shard_lib.check_batch(
    config.eval_batch_size, shard_lib.mesh_from_config(config), "eval_batch_size"
  )


# -----------------------------------------------------------------------------
# 2. Model
# -----------------------------------------------------------------------------
def build_model(config, num_classes: int) -> ViTClassifier:
  spec = zoo.resolve(config.model)
  rates = drop_path_rates(config.model.drop_path, spec.depth, "linear")
  return ViTClassifier(
    width=spec.width,
    depth=spec.depth,
    num_heads=spec.num_heads,
    num_classes=num_classes,
    patch_size=spec.patch_size,
    image_size=spec.image_size,
    in_chans=spec.in_chans,
    mlp_ratio=spec.mlp_ratio,
    drop_path=rates,
    global_pool=config.model.global_pool,
    linear_probe=config.mode == "linprobe",
    head_init_std=0.01 if config.mode == "linprobe" else 2e-5,
    dtype=run_config.compute_dtype(config),
    fused_attention=config.model.get("fused_attention", False),
    remat=config.model.get("remat", False),
    scan_blocks=config.model.get("scan_blocks", False),
  )


# -----------------------------------------------------------------------------
# 3. Initialisation from an earlier stage
# -----------------------------------------------------------------------------
def init_from_source(params: dict, config) -> tuple[dict, dict]:
  """The subtrees taken from `config.init.source` (`encoder`, and `head` /
  `fc_norm` when their shapes fit `params`) and the lineage record. Raises if
  the encoder is of another architecture."""
  source = config.init.source
  src = read_encoder(source, what="init.source")
  encoder = jax.tree_util.tree_map(np.asarray, src.encoder)
  spec = zoo.resolve(config.model)
  # Position embedding: from the fixed collection (pre-training) or a param
  # (fine-tuned source); resized bicubically to this resolution (MAE
  # interpolate_pos_embed, torch semantics).
  pos = encoder.pop("pos_embed", None)
  if pos is None and src.encoder_fixed is not None:
    pos = np.asarray(src.encoder_fixed["pos_embed"])
  if pos is None:
    pos = sincos_2d(spec.width, 1)[None]  # shape check below reports it
  grid = spec.image_size // spec.patch_size
  if pos.shape[-1] == spec.width and pos.shape[1] != grid * grid + 1:
    log.info("init: resizing position embedding %s -> grid %d", pos.shape, grid)
    pos = resize_pos_embed(pos, grid)
  encoder["pos_embed"] = pos
  want = shape_table(params["encoder"])
  got = shape_table(encoder)
  # A pre-training encoder has a final `norm` that global pooling drops
  # (MAE deletes it and uses a fresh fc_norm).
  extra = sorted(set(got) - set(want) - {"norm/scale", "norm/bias"})
  missing = sorted(set(want) - set(got))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if extra or missing or wrong:
    lines = [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in wrong[:8]]
    raise ValueError(
      f"init.source={source} is an encoder of another architecture than "
      f"model {spec.kwargs()}: "
      + "; ".join(
        lines
        + ([f"missing {missing[:6]}"] if missing else [])
        + ([f"unexpected {extra[:6]}"] if extra else [])
      )
      + ". Set --config.model.* to the checkpoint's architecture."
    )
  new = {"encoder": {k: encoder[k] for k in params["encoder"]}}
  for name in ("fc_norm", "head"):
    if name in src.head and name in params:
      if shape_table(src.head[name]) == shape_table(params[name]):
        new[name] = src.head[name]
        log.info("init: %s taken from %s", name, source)
      else:
        log.info(
          "init: %s of %s has shape %s, the model needs %s: re-initialised",
          name,
          source,
          shape_table(src.head[name]),
          shape_table(params[name]),
        )
  return new, src.record


# -----------------------------------------------------------------------------
# 4. Task
# -----------------------------------------------------------------------------
def soft_targets(batch, num_classes: int, smoothing: float) -> jax.Array:
  if "label_soft" in batch:
    return batch["label_soft"]
  return optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)


def build_task(
  config, model: ViTClassifier, steps_per_epoch: int, init_params_fn, evaluate
) -> loop_lib.Task:
  spec = zoo.resolve(config.model)
  total, warmup = run_config.steps(config, steps_per_epoch)
  schedule = schedules.warmup_cosine(run_config.peak_lr(config), config.min_lr, total, warmup)
  linprobe = config.mode == "linprobe"

  def init_variables(rng):
    return init_params_fn(rng)

  def loss_fn(params, fixed, batch, rng, inputs):
    variables = {"params": params, **fixed}
    image = batch["image"]
    if linprobe:
      logits, updates = model.apply(
        variables, image, train=True, rngs={"drop_path": rng}, mutable=["batch_stats"]
      )
      aux = {loop_lib.NEW_FIXED: {**fixed, **updates}}  # BN running statistics
    else:
      logits = model.apply(variables, image, train=True, rngs={"drop_path": rng})
      aux = {}
    targets = soft_targets(batch, model.num_classes, config.data.label_smoothing)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return loss, aux

  def make_optimizer(params, sched):
    o = config.optimizer
    if linprobe:
      # MAE main_linprobe: LARS (no wd on the head's bias), encoder frozen.
      tx = optax.lars(
        sched,
        weight_decay=o.weight_decay,
        weight_decay_mask=opt_lib.decay_mask(params),
        trust_ratio_mask=opt_lib.decay_mask(params),
        momentum=0.9,
      )
      labels = jax.tree_util.tree_map(
        lambda train: "train" if train else "frozen", opt_lib.regex_mask(params, [r"head/.*"])
      )
      return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return opt_lib.adamw(
      params,
      sched,
      b1=o.b1,
      b2=o.b2,
      weight_decay=o.weight_decay,
      no_decay_names=NO_DECAY,
      layer_decay=o.layer_decay,
      depth=spec.depth,
      clip_grad_norm=o.get("clip_grad_norm"),
      accumulate_steps=o.get("accumulate_steps", 1),
    )

  return loop_lib.Task(
    name=config.mode,
    init_variables=init_variables,
    loss_fn=loss_fn,
    make_optimizer=make_optimizer,
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    signature={
      "stage": config.mode,
      "model": spec.kwargs(),
      "num_classes": model.num_classes,
      "global_pool": bool(config.model.global_pool),
    },
    evaluate=evaluate,
    ema_decay=config.get("ema_decay", 0.0),
  )


# -----------------------------------------------------------------------------
# 5. Run
# -----------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir, lineage: dict | None = None, mesh=None):
  """Runs (or resumes) stage 3 in `workdir`; returns a summary dict."""
  validate(config)
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_augment = "linprobe" if config.mode == "linprobe" else "finetune"
  train_data = input_pipeline.make_dataset(
    run_config.data_config(config, train_augment, config.batch_size),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  eval_data = input_pipeline.make_dataset(
    run_config.data_config(config, "eval", config.eval_batch_size),
    split=config.data.eval_split,
    train=False,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  num_classes = config.get("num_classes") or train_data.num_classes
  if not num_classes:
    raise ValueError(f"dataset {config.data.name} has no class labels; set --config.num_classes")
  model = build_model(config, num_classes)
  spec = zoo.resolve(config.model)
  dummy = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_chans))
  parent = None
  if (
    config.init.source
    and ckpt_lib.checkpoint_dir(workdir).is_dir()
    and any(ckpt_lib.checkpoint_dir(workdir).iterdir())
  ):
    parent = (ckpt_lib.read_json(workdir, "lineage.json") or {}).get("parent")
  loaded: dict = {}
  if config.init.source and parent is None:
    # Read once on the host; the jitted init then overwrites fresh params.
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))
    zeros = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract["params"])
    loaded, parent = init_from_source(zeros, config)

  def init_params(rng):
    variables = model.init({"params": rng}, dummy)
    params = dict(variables["params"])
    for k, v in loaded.items():
      params[k] = jax.tree_util.tree_map(jnp.asarray, v)
    return {"params": params, "fixed": {k: v for k, v in variables.items() if k != "params"}}

  def apply_eval(variables, images):
    return model.apply({"params": variables["params"], **variables["fixed"]}, images)

  evaluator = make_evaluator(apply_eval, eval_data)

  def evaluate(state):
    metrics = evaluator({"params": state.params, "fixed": state.fixed})
    if state.ema is not None:  # the EMA weights, evaluated alongside
      ema = evaluator({"params": state.ema, "fixed": state.fixed})
      metrics.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
    return metrics

  task = build_task(config, model, train_data.steps_per_epoch, init_params, evaluate)
  record = {"stage": config.mode, "parent": parent}
  record.update(lineage or {})
  state = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=record,
  )
  if config.get("figures", True):
    # Learning curves and the eval confusion matrix of the final state.
    from mimdistill.visualize import confusion, curves

    counts = confusion.confusion_counts(  # every process: global batches
      apply_eval, {"params": state.params, "fixed": state.fixed}, eval_data, num_classes
    )
    if jax.process_index() == 0:
      for png in (
        curves.plot_learning_curves(
          workdir, workdir / "learning_curves.png", title=f"{config.mode} {workdir}"
        ),
        confusion.plot_confusion_matrix(
          counts,
          eval_data.class_names,
          workdir / "confusion_matrix.png",
          title=f"{config.mode}, {config.data.name} "
          f"{config.data.eval_split}, step {task.total_steps}",
        ),
      ):
        log.info("wrote %s", png)
  final = ckpt_lib.read_json(workdir, "final_metrics.json") or {}
  return {
    "stage": config.mode,
    "workdir": str(workdir),
    "steps": task.total_steps,
    "parent": parent,
    "top1": final.get("eval_top1"),
    "top5": final.get("eval_top5"),
    "best_step": final.get("best_step"),
    "final_loss": final.get("loss"),
    "train_seconds": final.get("train_seconds"),
  }
