"""Stage 4: semantic segmentation (TinyMIM's mmseg UperNet on ADE20K) of a
distilled, pre-trained or fine-tuned encoder, on the shared loop.

Reads top to bottom:
  1. `validate`: config checks that need no checkpoint and no data (crop
     size vs patch, out_indices vs depth, neck, eval mode, batches);
  2. `build_model`: `factory.build('segmentor', config.model,
     num_classes=...)`;
  3. `init_from_source`: a whole segmentor (mmseg checkpoint, a converted
     one, a stage-4 workdir: params and BatchNorm statistics; heads of
     another class count re-initialised), or an encoder (stage-1/2/3
     workdir, official / timm `.pth`) loaded into the backbone by
     `interop.segmentation_init` (position embedding resized to the crop;
     relative-position tables, layer scales, necks and heads keep the
     random init; every such part is logged). Host numpy, placed by the
     loop (`Task.pretrained`, `Task.pretrained_state`);
  4. `build_task`: the segmentor's train-mode forward (dropout and drop
     path, BatchNorm statistics over the global batch in
     `model_state['batch_stats']`), decode 1.0 + auxiliary 0.4
     cross-entropy, AdamW over TinyMIM's layer-decay groups, each with
     mmcv's poly schedule + linear warmup from its own initial lr;
  5. `run`: data (the eval canvas measured on the split when unset), the
     loop with evaluation (slide or whole, mIoU / mAcc / aAcc over padded,
     masked batches; best checkpoint by mIoU in `best/`), the per-class
     table (`per_class_iou.json`, `per_class_iou.txt`), `predictions.png`.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mimdistill import workdir as workdir_lib
from mimdistill.data import (
  input_pipeline,
  segmentation_classes,
  segmentation_sizes,
  segmentation_transforms,
  sources,
)
from mimdistill.interop.segmentation_init import init_backbone
from mimdistill.models import factory, variants
from mimdistill.models.segmentation_backbone import check_backbone
from mimdistill.models.segmentor import EncoderDecoder
from mimdistill.objectives.segmentation_loss import segmentation_loss
from mimdistill.paths import as_path
from mimdistill.stages import sources as stage_sources
from mimdistill.stages.cnn_sources import check_vit_source
from mimdistill.stages.synthetic import Synthetic, random_images
from mimdistill.training import loop as loop_lib
from mimdistill.training import run_config
from mimdistill.training import sharding as shard_lib
from mimdistill.training.poly_schedule import WARMUPS, poly_warmup
from mimdistill.training.segmentation_evaluate import MODES, SegmentationEvaluator, max_windows
from mimdistill.training.segmentation_optim import NO_DECAY_MODES, segmentation_adamw

log = logging.getLogger("mimdistill")
PER_CLASS = "per_class_iou"


# -----------------------------------------------------------------------------
# 1. Validation
# -----------------------------------------------------------------------------
def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  run_config.validate(config)
  m = config.model
  # Depth and patch first (any image size), so a crop that is not a multiple
  # of the patch gets the backbone's message.
  sizes = variants.resolve({**m.to_dict(), "image_size": None})
  check_backbone(
    neck=m.neck,
    patch_size=sizes.patch_size,
    image_size=int(config.data.image_size),
    depth=sizes.depth,
    out_indices=m.out_indices,
  )
  spec = variants.resolve(m)
  factory.compute_dtype(config.dtype)
  if spec.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={spec.image_size} differs from the crop data.image_size="
      f"{config.data.image_size}; set both alike"
    )
  if int(config.num_classes) < 1:
    raise ValueError("num_classes must be set (150 for ADE20K, 11 for embedded_segmentation)")
  if int(config.num_classes) < 2:
    raise ValueError(
      f"num_classes={config.num_classes} must be >= 2: one class leaves nothing to segment"
    )
  factory.check_segmentor_heads(m)
  segmentation_transforms.augment_from_config(run_config.data_config(config, "segment"))
  aux, levels = m.get("auxiliary_head"), len(m.out_indices)
  if aux is not None and not (isinstance(aux.in_index, int) and 0 <= aux.in_index < levels):
    raise ValueError(
      f"model.auxiliary_head.in_index={aux.in_index!r} must pick one of the neck's {levels} "
      f"feature maps (0..{levels - 1}; TinyMIM: 2)"
    )
  for name, weight in config.loss_weights.items():
    if not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
      raise ValueError(f"loss_weights.{name}={weight!r} must be a finite number >= 0")
  if not config.loss_weights.get("decode"):
    raise ValueError("loss_weights.decode must be > 0: the decode head's loss is the task's")
  power = config.schedule.power
  if not isinstance(power, (int, float)) or not 0 <= power < float("inf"):
    raise ValueError(
      f"schedule.power={power!r} must be a finite number >= 0: the poly decay's exponent "
      "(mmseg: 1.0; a negative one would raise the lr, an infinite one zero it after step 0)"
    )
  if config.eval.mode not in MODES:
    raise ValueError(f"eval.mode={config.eval.mode!r}; use one of {MODES}")
  if len(config.eval.stride) != 2 or min(config.eval.stride) < 1:
    raise ValueError(f"eval.stride={config.eval.stride} must be two positive ints")
  crop = int(config.data.image_size)
  if config.eval.mode == "slide" and max(config.eval.stride) > crop:
    # Windows further apart than they are wide leave pixels no window covers:
    # their logits would be divided by a count of 0.
    raise ValueError(
      f"eval.stride={tuple(config.eval.stride)} is larger than the {crop}-px window "
      f"(data.image_size): use a stride <= {crop} (mmseg: 2/3 of the crop)"
    )
  if not isinstance(config.num_pictures, int) or config.num_pictures < 0:
    raise ValueError(f"num_pictures={config.num_pictures!r} must be an integer >= 0 (0: none)")
  ratio = config.schedule.warmup_ratio
  if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
    raise ValueError(
      f"schedule.warmup_ratio={ratio!r} must be in [0, 1]: the warmup starts at "
      "warmup_ratio * lr (mmseg: 1e-6)"
    )
  warmup = config.warmup_steps
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup_steps={warmup!r} must be an integer >= 0 (0: warmup_epochs)")
  if config.optimizer.no_decay not in NO_DECAY_MODES:
    raise ValueError(f"optimizer.no_decay={config.optimizer.no_decay!r}; use {NO_DECAY_MODES}")
  if config.schedule.warmup not in WARMUPS:
    raise ValueError(f"schedule.warmup={config.schedule.warmup!r}; use one of {WARMUPS}")
  if config.total_steps < 1 and config.total_epochs <= 0:
    raise ValueError("set total_steps (segmentation counts iterations, 160k for ADE20K)")
  mesh = shard_lib.mesh_from_config(config)
  shard_lib.check_batch(config.batch_size, mesh)
  shard_lib.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
  if not data:
    return
  source = config.init.source
  if source:
    stage_sources.check_exists(source, "init.source")  # before the datasets are built
    check_vit_source(source, "init.source")
  sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)
  builder = sources.get_builder(config.data.name, config.data.data_dir, config.data.bad_files)
  features = builder.info.features
  label_key = config.data.get("label_key") or "annotation"
  if label_key not in features:
    raise ValueError(
      f"data.name={config.data.name!r} has no per-pixel {label_key!r} feature (it has "
      f"{sorted(features)}): segmentation needs image / annotation pairs, e.g. "
      "'embedded_segmentation', 'ade20k:<root>' or 'folder:<root>' with "
      "root/images/<split>/*.jpg and root/annotations/<split>/*.png"
    )


# -----------------------------------------------------------------------------
# 2. Model
# -----------------------------------------------------------------------------
def build_model(config) -> EncoderDecoder:
  return factory.build(
    "segmentor", config.model, num_classes=int(config.num_classes), dtype=config.dtype
  )


def _dummy(config, batch: int = 1) -> jax.Array:
  spec = variants.resolve(config.model)
  return jnp.zeros((batch, spec.image_size, spec.image_size, spec.in_chans))


def abstract_variables(model: EncoderDecoder, config) -> dict:
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), _dummy(config))


# -----------------------------------------------------------------------------
# 3. Initialisation from an earlier stage
# -----------------------------------------------------------------------------
def _flat(tree) -> dict:
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _unflat(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _take_matching(template, given, what: str, source: str) -> tuple[dict, list[str]]:
  """Leaves of `given` whose path and shape fit `template`; a conv_seg of
  another shape (another class count) is left to its random init. Anything
  else that does not fit is an error."""
  want, got = _flat(template), _flat(given)
  taken, reinit, wrong = {}, [], []
  for path, leaf in got.items():
    if path not in want:
      wrong.append(f"unexpected {what}/{path}")
    elif tuple(np.shape(leaf)) != tuple(want[path].shape):
      if "/conv_seg/" in f"/{path}":
        reinit.append(path)
      else:
        wrong.append(f"{what}/{path}: source {np.shape(leaf)} vs model {want[path].shape}")
    else:
      taken[path] = np.asarray(leaf).astype(want[path].dtype)
  missing = [p for p in want if p not in got]
  if wrong or missing:
    raise ValueError(
      f"init.source={source} is a segmentor of another architecture than the model: "
      + "; ".join(wrong[:6] + [f"missing {what}/{m}" for m in missing[:6]])
      + ". Set --config.model.* (and num_classes) to the checkpoint's architecture."
    )
  return _unflat(taken), reinit


def _zero_given(tree: dict, given: dict) -> dict:
  out = dict(tree)
  for name, sub in given.items():
    if isinstance(sub, dict):
      out[name] = _zero_given(out[name], sub)
    else:
      out[name] = jnp.zeros_like(out[name])
  return out


def init_from_source(model: EncoderDecoder, config) -> tuple[dict, dict | None, dict]:
  """`(pretrained params, pretrained model_state or None, lineage record)`
  from `config.init.source` (host numpy; see the module doc)."""
  source = config.init.source
  template = abstract_variables(model, config)
  whole = stage_sources.read_segmentor(source, what="init.source")
  if whole is not None:
    params, reinit = _take_matching(template["params"], whole.params, "params", source)
    stats, _ = _take_matching(
      template.get("batch_stats", {}), whole.batch_stats, "batch_stats", source
    )
    log.info("init: whole segmentor from %s (%d tensors)", source, len(_flat(params)))
    for path in reinit:
      log.info("init: %s has another class count in %s: re-initialised", path, source)
    return params, {"batch_stats": stats}, whole.record
  src = stage_sources.read_encoder(source, what="init.source")
  encoder = jax.tree_util.tree_map(np.asarray, src.encoder)
  fixed = (
    None if src.encoder_fixed is None else jax.tree_util.tree_map(np.asarray, src.encoder_fixed)
  )
  loaded, report = init_backbone(
    template["params"]["backbone"],
    encoder,
    fixed,
    num_prefix_tokens=model.backbone.num_prefix_tokens,
    only_loaded=True,
  )
  log.info("init: backbone encoder from %s:\n%s", source, report)
  for name in ("decode_head", "auxiliary_head"):
    if name in template["params"]:
      log.info("init: %s newly initialised", name)
  record = dict(src.record)
  record["init"] = {
    "loaded": len(report.loaded),
    "initialised": sorted(report.initialised),
    "skipped": sorted(report.skipped),
    "resized": report.resized,
  }
  return {"backbone": loaded}, None, record


# -----------------------------------------------------------------------------
# 4. Task
# -----------------------------------------------------------------------------
def steps(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total iterations, warmup iterations)."""
  total, warmup = run_config.steps(config, steps_per_epoch)
  if config.warmup_steps:
    warmup = int(config.warmup_steps)
  if warmup > total - 1 > 0:
    # A short trial of a long recipe still runs, as run_config.steps does
    # for epochs, but says that its warmup was cut.
    log.warning(
      "warmup_steps=%d is not shorter than total_steps=%d: the warmup is cut to %d steps "
      "(set --config.warmup_steps lower to choose it)",
      warmup,
      total,
      total - 1,
    )
  return total, min(warmup, max(total - 1, 0))


def make_schedule_for(config, total: int, warmup: int):
  """`initial_lr -> schedule`: mmcv's poly with warmup by iteration."""
  s = config.schedule
  kind = s.warmup if warmup > 0 else None
  return lambda lr: poly_warmup(
    lr,
    total,
    power=float(s.power),
    min_lr=float(config.min_lr),
    warmup=kind,
    warmup_iters=warmup,
    warmup_ratio=float(s.warmup_ratio),
  )


def make_optimizer(config, params, schedule_for) -> optax.GradientTransformation:
  o = config.optimizer
  tx = segmentation_adamw(
    params,
    run_config.peak_lr(config),
    schedule_for,
    num_layers=variants.resolve(config.model).depth,
    layer_decay_rate=float(o.layer_decay),
    b1=o.b1,
    b2=o.b2,
    weight_decay=o.weight_decay,
    no_decay=o.no_decay,
  )
  if o.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
  if o.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.accumulate_steps)
  return tx


def build_task(
  config,
  model: EncoderDecoder,
  steps_per_epoch: int,
  *,
  pretrained: dict | None = None,
  pretrained_state: dict | None = None,
  evaluate=None,
) -> loop_lib.Task:
  spec = variants.resolve(config.model)
  total, warmup = steps(config, steps_per_epoch)
  schedule_for = make_schedule_for(config, total, warmup)
  weights = {k: float(v) for k, v in config.loss_weights.items()}
  dummy = _dummy(config)

  def init_variables(rng):
    variables = model.init({"params": rng}, dummy)
    if not pretrained:
      return variables
    # Leaves the pretrained weights replace are zeros here, so XLA drops
    # their random draws (compiling an init's RNG is costly on CPU).
    return {**variables, "params": _zero_given(variables["params"], pretrained)}

  def loss_fn(params, model_state, batch, rng, inputs):
    k_dropout, k_path = jax.random.split(rng)
    out, updates = model.apply(
      {"params": params, **model_state},
      batch["image"],
      train=True,
      rngs={"dropout": k_dropout, "drop_path": k_path},
      mutable=["batch_stats"],
    )
    loss, metrics = segmentation_loss(out, batch["label"], weights=weights)
    metrics.pop("loss")
    return loss, (metrics, {**model_state, **updates})

  return loop_lib.Task(
    name="segment",
    init_variables=init_variables,
    loss_fn=loss_fn,
    make_optimizer=lambda params, _: make_optimizer(config, params, schedule_for),
    # The top group's (necks and heads, lr scale 1): what the loop logs.
    schedule=schedule_for(run_config.peak_lr(config)),
    total_steps=total,
    images_per_step=config.batch_size,
    accumulate_steps=config.optimizer.accumulate_steps,
    pretrained=pretrained,
    pretrained_state=pretrained_state,
    signature={
      "stage": "segment",
      "model": spec.kwargs(),
      "num_classes": int(config.num_classes),
      "neck": config.model.neck,
      "out_indices": [int(i) for i in config.model.out_indices],
      "decode_channels": int(config.model.decode_head.channels),
    },
    evaluate=evaluate,
    best_metric="mIoU",
  )


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The task from a random init and a random batch (init.source is not read)."""
  validate(config, data=False)
  model = build_model(config)
  task = build_task(config, model, steps_per_epoch)
  spec = variants.resolve(config.model)
  rng = np.random.default_rng(config.seed)
  b, k = config.batch_size, int(config.num_classes)
  batch = {
    "image": random_images(b, spec, rng),
    "label": rng.integers(0, k, (b, spec.image_size, spec.image_size), dtype=np.int32),
  }
  notes = ["init.source is not read: random init (same speed)"] if config.init.source else []
  info = {
    "image_size": spec.image_size,
    "fused_attention": bool(config.model.fused_attention),
    "remat": bool(config.model.remat),
    "scan_blocks": bool(config.model.scan_blocks),
    "model": f"UperNet on ViT w{spec.width} d{spec.depth} h{spec.num_heads} p{spec.patch_size}, "
    f"{k} classes, decode {config.model.decode_head.channels} channels",
  }
  return Synthetic("segment", task, batch, info, notes)


# -----------------------------------------------------------------------------
# 5. Run
# -----------------------------------------------------------------------------
def eval_data_config(config) -> ml_collections.ConfigDict:
  """The eval pipeline's config, with the canvas measured on the split when
  `data.eval_pad_size` / `eval_label_pad_size` are unset."""
  data = run_config.data_config(config, "segment_eval", config.eval_batch_size)
  if not data.get("eval_pad_size") or not data.get("eval_label_pad_size"):
    builder = sources.get_builder(config.data.name, config.data.data_dir)
    sources.ensure_prepared(builder)
    source = sources.open_split(builder, config.data.eval_split)
    resized, original = segmentation_sizes.eval_canvas(source, tuple(config.data.img_scale))
    with data.unlocked():
      data.eval_pad_size = tuple(data.get("eval_pad_size") or resized)
      data.eval_label_pad_size = tuple(data.get("eval_label_pad_size") or original)
    log.info(
      "eval canvas (short x long): resized images %s, labels %s",
      data.eval_pad_size,
      data.eval_label_pad_size,
    )
  if config.eval.mode == "whole" and max(data.eval_pad_size) > config.data.image_size:
    raise ValueError(
      f"eval.mode='whole' runs the backbone once on a {config.data.image_size}-px crop, but "
      f"eval images are resized up to {tuple(data.eval_pad_size)}; use eval.mode='slide' or "
      "a data.img_scale within the crop"
    )
  return data


def make_evaluator(config, model: EncoderDecoder, eval_data, canvas) -> SegmentationEvaluator:
  crop = int(config.data.image_size)
  stride = tuple(int(s) for s in config.eval.stride)
  padded = (max(canvas[0], crop), max(canvas[1], crop))
  return SegmentationEvaluator(
    apply_fn=lambda variables, x: model.apply(variables, x, method=model.encode_decode),
    eval_data=eval_data,
    num_classes=int(config.num_classes),
    crop=crop,
    stride=stride,
    windows=max_windows(padded, crop, stride, config.eval.mode),
    mode=config.eval.mode,
  )


def write_per_class(workdir, last: dict, names, step: int) -> None:
  """`per_class_iou.json` and a readable `per_class_iou.txt` (percent, as
  mmseg prints them; NaN: the class is absent from the labels)."""
  if jax.process_index() != 0:
    return
  pct = lambda v: None if not np.isfinite(v) else round(float(v) * 100, 2)
  rows = [
    {"class": names[i], "IoU": pct(last["IoU"][i]), "Acc": pct(last["Acc"][i])}
    for i in range(len(names))
  ]
  record = {
    "step": int(step),
    "mIoU": pct(last["mIoU"]),
    "mAcc": pct(last["mAcc"]),
    "aAcc": pct(last["aAcc"]),
    "classes": rows,
  }
  workdir_lib.write_json(workdir, f"{PER_CLASS}.json", record)
  width = max(12, *(len(r["class"]) for r in rows))
  fmt = lambda v: "nan" if v is None else f"{v:.2f}"
  lines = [f"{'Class':<{width}} {'IoU':>7} {'Acc':>7}", "-" * (width + 16)]
  lines += [f"{r['class']:<{width}} {fmt(r['IoU']):>7} {fmt(r['Acc']):>7}" for r in rows]
  lines += [
    "-" * (width + 16),
    f"{'mIoU / mAcc':<{width}} {fmt(record['mIoU']):>7} {fmt(record['mAcc']):>7}",
    f"{'aAcc':<{width}} {fmt(record['aAcc']):>7}",
    f"(step {step}; percent; nan = class absent from the labels)",
  ]
  (as_path(workdir) / f"{PER_CLASS}.txt").write_text("\n".join(lines) + "\n")


def _gather(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def write_predictions(config, workdir, evaluator, variables, eval_data, names, step) -> None:
  """`predictions.png`: the first eval examples' image, ground truth and
  prediction (every process takes part: the batch is global)."""
  from mimdistill.visualize import segmentation as seg_pictures

  batch = eval_data.first_batch()
  pred = _gather(evaluator.predict(variables, batch))
  host = {k: _gather(v) for k, v in batch.items()}
  if jax.process_index() != 0:
    return
  n = min(int(config.num_pictures), int(host["mask"].sum()))
  images, labels, preds = [], [], []
  mean = np.asarray(config.data.mean, np.float32)
  std = np.asarray(config.data.std, np.float32)
  for i in range(n):
    t = bool(host["transposed"][i])
    h, w = host["img_shape"][i]
    oh, ow = host["ori_shape"][i]
    image = host["image"][i].transpose(1, 0, 2) if t else host["image"][i]
    label = host["label"][i].T if t else host["label"][i]
    p = pred[i].T if t else pred[i]
    images.append(np.clip(image[:h, :w] * std + mean, 0, 255).astype(np.uint8))
    labels.append(label[:oh, :ow])
    preds.append(p[:oh, :ow])
  png = seg_pictures.plot_predictions(
    images,
    labels,
    preds,
    names,
    as_path(workdir) / "predictions.png",
    title=f"segment, {config.data.name} {config.data.eval_split}, step {step}",
  )
  log.info("wrote %s", png)


def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
  """Runs (or resumes) stage 4 in `workdir`; returns a summary dict."""
  validate(config)
  workdir = as_path(workdir)
  mesh = mesh or shard_lib.mesh_from_config(config)
  train_data = input_pipeline.make_dataset(
    run_config.data_config(config, "segment", config.batch_size),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  eval_config = eval_data_config(config)
  eval_data = input_pipeline.make_dataset(
    eval_config,
    split=config.data.eval_split,
    train=False,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  model = build_model(config)
  parent = None
  if config.init.source and workdir_lib.has_checkpoints(workdir):
    parent = (workdir_lib.read_json(workdir, workdir_lib.LINEAGE) or {}).get("parent")
  pretrained = pretrained_state = None
  if config.init.source and parent is None:
    pretrained, pretrained_state, parent = init_from_source(model, config)
  elif not config.init.source:
    log.info("init: no init.source, the whole segmentor starts from its random init")

  evaluator = make_evaluator(config, model, eval_data, tuple(eval_config.eval_pad_size))

  def evaluate(state):
    return evaluator({"params": state.params, **state.model_state})

  task = build_task(
    config,
    model,
    train_data.steps_per_epoch,
    pretrained=pretrained,
    pretrained_state=pretrained_state,
    evaluate=evaluate,
  )
  record = {"stage": "segment", "parent": parent}
  record.update(lineage or {})
  result = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=record,
  )
  names = segmentation_classes.class_names(config.data.name, int(config.num_classes))
  if evaluator.last is not None:
    write_per_class(workdir, evaluator.last, names, task.total_steps)
  if config.figures:
    state = result.state
    write_predictions(
      config,
      workdir,
      evaluator,
      {"params": state.params, **state.model_state},
      eval_data,
      names,
      task.total_steps,
    )
  final = result.metrics
  summary = {
    "stage": "segment",
    "workdir": str(workdir),
    "steps": task.total_steps,
    "parent": parent,
    "mIoU": final.get("eval_mIoU"),
    "mAcc": final.get("eval_mAcc"),
    "aAcc": final.get("eval_aAcc"),
    "best_step": final.get("best_step"),
    "final_loss": final.get("loss"),
    "train_seconds": final.get("train_seconds"),
  }
  log.debug("segment summary %s", json.dumps(summary, default=str))
  return summary
