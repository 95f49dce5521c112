"""Stage 3: fine-tuning (MAE `main_finetune.py`) or linear probing
(`main_linprobe.py`) of a pre-trained or distilled encoder.

Reads top to bottom:
  1. `validate`: config checks that need no checkpoint and no data;
  2. `build_model`: a `ViTClassifier` with a learnable position embedding,
     the head count of *this* config (distillation may have used another);
  3. `init_from_source`: the encoder from a stage-1/2 workdir or a `.pth`,
     checked against the model, position embedding resized bicubically when
     the resolution differs; a head is kept only if its shape fits. The
     loaded weights stay on the host until the loop places them with their
     shardings (`Task.pretrained`): they are never constants of a compiled
     program;
  4. `load_kd_teacher` (knowledge distillation, `kd.type` soft / hard): the
     frozen classifier from `kd.teacher.source`, checked against the
     `kd.teacher` section and the model's class count before anything
     compiles; its variables are the loop's non-trained `inputs` (sharded
     like params, FSDP when set; never optimised, never saved);
  5. `build_task`: soft-target cross-entropy (mixup/cutmix + label smoothing
     from the data pipeline) on the CLS head, plus DeiT's distillation term
     on the distillation head (`objectives.kd_loss`), the teacher in eval
     mode on the same mixed images; AdamW with layer-wise lr decay and the
     official no-weight-decay set (linear probe: LARS, encoder frozen);
  6. `run`: data, the shared loop with periodic eval (best kept), pictures,
     the summary.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mimdistill import workdir as workdir_lib
from mimdistill.data import finetune_transforms, input_pipeline, sources
from mimdistill.data import mixup as mixup_lib
from mimdistill.data.transforms import normalize
from mimdistill.models import factory, variants
from mimdistill.models.classifier import DIST_POOLS, ViTClassifier
from mimdistill.models.pos_embed import resize_pos_embed, sincos_2d
from mimdistill.objectives import kd_loss
from mimdistill.paths import as_path
from mimdistill.stages import cnn_finetune
from mimdistill.stages import sources as stage_sources
from mimdistill.stages.sources import HEAD_PARTS, read_classifier, read_encoder, shape_table
from mimdistill.stages.synthetic import Synthetic, random_images
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib
from mimdistill.training.evaluate import make_evaluator

log = logging.getLogger("mimdistill")

# MAE main_finetune: model.no_weight_decay() = {pos_embed, cls_token}.
NO_DECAY = ("pos_embed", "cls_token")
MODES = ("finetune", "linprobe")
# What the benchmark assumes when the dataset (and so the class count) is not read.
SYNTHETIC_NUM_CLASSES = 1000


# -----------------------------------------------------------------------------
# 1. Validation
# -----------------------------------------------------------------------------
def validate(config: ml_collections.ConfigDict, *, data: bool = True) -> None:
  spec = cnn_finetune.model_spec(config)  # a ViT's variants.resolve, or a CNN's
  factory.compute_dtype(config.dtype)
  run_config.validate(config)
  if not isinstance(config.num_classes, int) or config.num_classes < 0 or config.num_classes == 1:
    raise ValueError(
      f"num_classes={config.num_classes!r}: a classifier needs at least 2 classes (0: from the "
      "dataset)"
    )
  if spec.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={spec.image_size} differs from "
      f"data.image_size={config.data.image_size}; set both alike"
    )
  if not isinstance(config.ema_decay, (int, float)) or not 0 <= config.ema_decay < 1:
    raise ValueError(
      f"ema_decay={config.ema_decay!r} must be in [0, 1) (0: no EMA of the weights; DeiT uses "
      "0.99996)"
    )
  if config.mode not in MODES:
    raise ValueError(f"mode={config.mode!r}: use 'finetune' or 'linprobe'")
  _check_random_erasing(config.data)
  _check_mixup_and_randaugment(config.data)
  for section, name in ((config.model, "model"), (config.kd.teacher, "kd.teacher")):
    extra = section.get("extra_width") or 0
    if not isinstance(extra, int) or extra < 0:
      raise ValueError(
        f"{name}.extra_width={extra!r} must be an integer >= 0 (0: no extra layer; "
        "TinyMIM*-T: 1280)"
      )
  vit_sections = [(config.kd.teacher, "kd.teacher")]
  if not cnn_finetune.is_cnn(config):  # a CNN section has no tokens
    vit_sections.append((config.model, "model"))
  for section, name in vit_sections:
    if section.dist_pool not in DIST_POOLS:
      raise ValueError(f"{name}.dist_pool={section.dist_pool!r} is not one of {DIST_POOLS}")
  if config.mode == "linprobe" and config.model.get("dist_token"):
    raise ValueError(
      "linear probing of a distillation-token model is not supported; set "
      "--config.model.dist_token=False"
    )
  kd = config.kd
  if kd.type not in kd_loss.KD_TYPES:
    raise ValueError(f"kd.type={kd.type!r} is not one of {kd_loss.KD_TYPES}")
  if kd.type != "none":
    if config.mode == "linprobe":
      raise ValueError("knowledge distillation is for fine-tuning; set --config.kd.type=none")
    # Written so that NaN fails too (every comparison with NaN is False).
    if not (0 <= kd.alpha <= 1 and 0 < kd.tau < float("inf")):
      raise ValueError(f"kd.alpha={kd.alpha} must be in [0, 1] and kd.tau={kd.tau} finite and > 0")
    teacher = variants.resolve(kd.teacher, "kd.teacher")
    if teacher.image_size != config.data.image_size:
      raise ValueError(
        f"kd.teacher.image_size={teacher.image_size} differs from data.image_size="
        f"{config.data.image_size}; the teacher sees the student's (mixed) images: set both "
        "alike"
      )
  mesh = shard_lib.mesh_from_config(config)
  shard_lib.check_batch(config.batch_size, mesh)
  shard_lib.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
  if not data:
    return
  if config.mode == "linprobe" and not config.init.source:
    raise ValueError(
      "linear probing needs a pre-trained encoder: set --config.init.source=<workdir or .pth>"
    )
  if kd.type != "none" and not kd.teacher.source:
    raise ValueError(
      f"kd.type={kd.type!r} needs a teacher: set --config.kd.teacher.source= a fine-tuned "
      "classifier (stage-3 workdir or its best/, official MAE fine-tuned .pth, timm ViT "
      ".pth / .safetensors), or --config.kd.type=none"
    )
  # Both are read after the datasets are built (a class folder is prepared on
  # first use): a missing one is named first.
  if config.init.source:
    stage_sources.check_exists(config.init.source, "init.source")
  if kd.type != "none":
    stage_sources.check_exists(kd.teacher.source, "kd.teacher.source")
  sources.check_available(config.data.name, config.data.data_dir, config.data.bad_files)


def _check_mixup_and_randaugment(data) -> None:
  """timm's Mixup / CutMix and RandAugment options, named by their config
  fields: a negative alpha or smoothing would otherwise fail when the input
  pipeline is built (after the init source is read), a bad RandAugment
  string when the first batch is drawn."""
  for field in ("mixup", "cutmix"):
    value = data.get(field, 0.0)
    if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
      raise ValueError(
        f"data.{field}={value!r} must be a finite number >= 0: the Beta distribution's alpha "
        "(0: off; MAE: mixup 0.8, cutmix 1.0)"
      )
  for field, top in (("label_smoothing", "1)"), ("mixup_prob", "1]"), ("mixup_switch_prob", "1]")):
    value = data.get(field)
    if value is None:
      continue
    ok = isinstance(value, (int, float)) and (0 <= value < 1 if top == "1)" else 0 <= value <= 1)
    if not ok:
      raise ValueError(f"data.{field}={value!r} must be in [0, {top}")
  mode = data.get("mixup_mode", "batch")
  if mode not in mixup_lib.MODES:
    raise ValueError(f"data.mixup_mode={mode!r} is not one of {mixup_lib.MODES}")
  if data.get("auto_augment"):
    finetune_transforms.rand_augment_transform(data.auto_augment)  # parses the string


def _check_random_erasing(data) -> None:
  """timm's RandomErasing options, checked even when `reprob` = 0 leaves
  them unused, so that turning it on later does not fail mid-run."""
  prob, mode, count = data.get("reprob", 0.0), data.get("remode", "pixel"), data.get("recount", 1)
  if not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
    raise ValueError(
      f"data.reprob={prob!r} must be in [0, 1]: the probability of erasing (MAE uses 0.25)"
    )
  if mode not in finetune_transforms.RE_MODES:
    raise ValueError(f"data.remode={mode!r} is not one of {finetune_transforms.RE_MODES}")
  if not isinstance(count, int) or count < 1:
    raise ValueError(f"data.recount={count!r} must be an integer >= 1 (rectangles per image)")


# -----------------------------------------------------------------------------
# 2. Model
# -----------------------------------------------------------------------------
def build_model(config, num_classes: int) -> ViTClassifier:
  if cnn_finetune.is_cnn(config):
    return cnn_finetune.build_model(config, num_classes)
  linprobe = config.mode == "linprobe"
  return factory.build(
    "classifier",
    config.model,
    num_classes=num_classes,
    dtype=config.dtype,
    linear_probe=linprobe,
    head_init_std=0.01 if linprobe else 2e-5,
  )


def abstract_params(model: ViTClassifier) -> dict:
  if not hasattr(model, "encoder"):  # a CNNClassifier
    return cnn_finetune.abstract_params(model)
  enc = model.encoder
  dummy = jnp.zeros((1, enc.image_size, enc.image_size, enc.in_chans))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]


# -----------------------------------------------------------------------------
# 3. Initialisation from an earlier stage
# -----------------------------------------------------------------------------
def init_from_source(params: dict, config) -> tuple[dict, dict]:
  """The subtrees taken from `config.init.source` (`encoder`, and `head` /
  `fc_norm` when their shapes fit `params`, an abstract params tree) as host
  numpy, and the lineage record. Raises if the encoder is of another
  architecture."""
  if cnn_finetune.is_cnn(config):
    return cnn_finetune.init_from_source(params, config)
  source = config.init.source
  src = read_encoder(source, what="init.source")
  encoder = jax.tree_util.tree_map(np.asarray, src.encoder)
  spec = variants.resolve(config.model)
  # Position embedding: from the fixed collection (pre-training) or a param
  # (fine-tuned source); resized bicubically to this resolution (MAE
  # interpolate_pos_embed, torch semantics).
  pos = encoder.pop("pos_embed", None)
  if pos is None and src.encoder_fixed is not None:
    pos = np.asarray(src.encoder_fixed["pos_embed"])
  if pos is None:
    pos = sincos_2d(spec.width, 1)[None]  # shape check below reports it
  grid = spec.grid_size
  prefix = 2 if config.model.dist_token else 1  # [cls, dist?]
  rows = pos.shape[1] - prefix
  square = rows > 0 and round(np.sqrt(rows)) ** 2 == rows  # else the shape check says why
  if pos.shape[-1] == spec.width and rows != grid * grid and square:
    log.info("init: resizing position embedding %s -> grid %d", pos.shape, grid)
    pos = resize_pos_embed(pos, grid, num_extra_tokens=prefix)
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
  for name in HEAD_PARTS:
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
# 4. The knowledge-distillation teacher
# -----------------------------------------------------------------------------
def build_kd_teacher(config, num_classes: int) -> ViTClassifier:
  """The frozen classifier of `kd.teacher` (run in eval mode only)."""
  return factory.build("classifier", config.kd.teacher, num_classes=num_classes, dtype=config.dtype)


def _describe_model(model: dict) -> str:
  keys = ("width", "depth", "num_heads", "patch_size", "image_size", "dist_token", "extra_width")
  return " ".join(f"{k}={model[k]}" for k in keys if k in model)


def load_kd_teacher(config, num_classes: int) -> tuple[ViTClassifier, dict, dict]:
  """(teacher module, its variables as host numpy, lineage record of the
  source). Raises before anything compiles if the source is not a
  classifier, has another class count or another architecture than
  `kd.teacher`."""
  source = config.kd.teacher.source
  src = read_classifier(source, what="kd.teacher.source")
  classes = int(np.shape(src.params["head"]["kernel"])[-1])
  if classes != num_classes:
    raise ValueError(
      f"kd.teacher.source={source} classifies {classes} classes but the model has "
      f"{num_classes}; the teacher must be fine-tuned on the same classes"
    )
  teacher = build_kd_teacher(config, num_classes)
  want = shape_table(abstract_params(teacher))
  got = shape_table(src.params)
  diffs = [f"missing {k} {want[k]}" for k in want if k not in got]
  diffs += [f"unexpected {k} {got[k]}" for k in got if k not in want]
  diffs += [
    f"{k} is {got[k]}, kd.teacher wants {want[k]}" for k in want if k in got and got[k] != want[k]
  ]
  if diffs:
    shown = "; ".join(diffs[:8]) + (f"; ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
    hint = f" (its config.json says: {_describe_model(src.model)})" if src.model else ""
    raise ValueError(
      f"kd.teacher.source={source} is of another architecture than kd.teacher "
      f"({variants.resolve(config.kd.teacher).kwargs()}){hint}: {shown}. Set "
      "--config.kd.teacher.* (variant, width, depth, num_heads, patch_size, image_size, "
      "global_pool, dist_token, extra_width) to the teacher's architecture."
    )
  params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), src.params)
  record = dict(src.record, model=variants.resolve(config.kd.teacher).kwargs())
  return teacher, {"params": params}, record


def random_kd_teacher(config, num_classes: int) -> tuple[ViTClassifier, dict]:
  """Random teacher variables drawn on the host (benchmarks and scale tests:
  speed does not depend on the weights)."""
  teacher = build_kd_teacher(config, num_classes)
  rng = np.random.default_rng(config.seed + 1)
  params = jax.tree_util.tree_map_with_path(
    lambda path, a: (
      float("scale" in jax.tree_util.keystr(path)) + 0.05 * rng.standard_normal(a.shape)
    ).astype(np.float32),
    abstract_params(teacher),
  )
  return teacher, {"params": params}


# -----------------------------------------------------------------------------
# 5. Task
# -----------------------------------------------------------------------------
def soft_targets(batch, num_classes: int, smoothing: float) -> jax.Array:
  if "label_soft" in batch:
    return batch["label_soft"]
  return optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)


def make_optimizer(config, params, schedule) -> optax.GradientTransformation:
  if cnn_finetune.is_cnn(config):
    return cnn_finetune.make_optimizer(config, params, schedule)
  o = config.optimizer
  if config.mode == "linprobe":
    # MAE main_linprobe: LARS (no wd on the head's bias), encoder frozen.
    tx = optax.lars(
      schedule,
      weight_decay=o.weight_decay,
      weight_decay_mask=opt_lib.decay_mask(params),
      trust_ratio_mask=opt_lib.decay_mask(params),
      momentum=0.9,
    )
    labels = jax.tree_util.tree_map(
      lambda train: "train" if train else "frozen", opt_lib.regex_mask(params, [r"head/.*"])
    )
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return opt_lib.from_config(
    params,
    schedule,
    o,
    no_decay_names=NO_DECAY,
    layer_decay=o.layer_decay,
    depth=variants.resolve(config.model).depth,
  )


def build_task(
  config,
  model: ViTClassifier,
  steps_per_epoch: int,
  *,
  pretrained: dict | None = None,
  evaluate=None,
  teacher: ViTClassifier | None = None,
  teacher_variables: dict | None = None,
) -> loop_lib.Task:
  """`teacher` / `teacher_variables`: the frozen KD teacher (needed when
  `kd.type` is not 'none'), passed to every step as the loop's `inputs`."""
  spec = cnn_finetune.model_spec(config)
  cnn = cnn_finetune.is_cnn(config)
  kd = config.kd
  if kd.type != "none" and (teacher is None or teacher_variables is None):
    raise ValueError(f"kd.type={kd.type!r}: build_task needs the teacher and its variables")
  total, warmup = run_config.steps(config, steps_per_epoch)
  schedule = schedules.warmup_cosine(run_config.peak_lr(config), config.min_lr, total, warmup)
  if cnn:  # SparK's fine-tuning schedule
    schedule = cnn_finetune.schedule(config, total, warmup, run_config.peak_lr(config))
  linprobe = config.mode == "linprobe"
  dummy = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_chans))

  def init_variables(rng):
    return model.init({"params": rng}, dummy)

  def loss_fn(params, model_state, batch, rng, inputs):
    variables = {"params": params, **model_state}
    image = normalize(batch["image"])
    if linprobe or cnn:
      logits, updates = model.apply(
        variables, image, train=True, rngs={"drop_path": rng}, mutable=["batch_stats"]
      )
      model_state = {**model_state, **updates}  # BN running statistics
    else:
      logits = model.apply(variables, image, train=True, rngs={"drop_path": rng})
    targets = soft_targets(batch, model.num_classes, config.data.label_smoothing)
    base = kd_loss.soft_target_cross_entropy
    if cnn:  # BCE or CE, as SparK's recipe says
      base = functools.partial(cnn_finetune.loss, config)
    if kd.type == "none" and not getattr(model, "distilled", False):
      return base(logits, targets), ({}, model_state)
    # The teacher: eval mode, the same (mixed) images, no gradient.
    t_logits = teacher.apply(inputs, image) if kd.type != "none" else None
    loss, parts = kd_loss.distillation_loss(
      logits,
      targets,
      t_logits,
      base=base,
      kd_type=kd.type,
      alpha=float(kd.alpha),
      tau=float(kd.tau),
    )
    metrics = {f"{k}_loss": v for k, v in parts.items()} if kd.type != "none" else {}
    return loss, (metrics, model_state)

  return loop_lib.Task(
    name=config.mode,
    init_variables=init_variables,
    loss_fn=loss_fn,
    make_optimizer=lambda params, sched: make_optimizer(config, params, sched),
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    accumulate_steps=config.optimizer.accumulate_steps,
    inputs=teacher_variables if kd.type != "none" else None,
    pretrained=pretrained,
    signature=signature(config, spec, model),
    evaluate=evaluate,
    ema_decay=config.ema_decay,
  )


def signature(config, spec, model: ViTClassifier) -> dict:
  sig = {
    "stage": config.mode,
    "model": spec.kwargs(),
    "num_classes": model.num_classes,
    "global_pool": bool(config.model.global_pool),
  }
  # Only when set, so that workdirs of plain classifiers keep resuming.
  if getattr(model, "distilled", False):
    sig.update(dist_token=True, dist_pool=model.dist_pool)
  if getattr(model, "extra_width", None):
    sig["extra_width"] = int(model.extra_width)
  return sig


def synthetic(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Synthetic:
  """The task from a random init (init.source is not read: same speed) and a
  random batch."""
  validate(config, data=False)
  notes = []
  num_classes = int(config.num_classes)
  if not num_classes:
    num_classes = SYNTHETIC_NUM_CLASSES
    notes.append(f"num_classes=0 (from the dataset): benchmarked with {num_classes}")
  if config.init.source:
    notes.append("init.source is not read: random init (same speed)")
  model = build_model(config, num_classes)
  teacher = teacher_vars = None
  if config.kd.type != "none":
    source = config.kd.teacher.source
    if source and ("://" in source or workdir_lib.parse_source(source)[0].exists()):
      teacher, teacher_vars, _ = load_kd_teacher(config, num_classes)
    else:
      teacher, teacher_vars = random_kd_teacher(config, num_classes)
      notes.append(
        "kd teacher: random init (kd.teacher.source "
        + (f"{source!r} does not exist" if source else "is empty")
        + "); speed does not depend on the weights"
      )
  task = build_task(config, model, steps_per_epoch, teacher=teacher, teacher_variables=teacher_vars)
  spec = cnn_finetune.model_spec(config)
  rng = np.random.default_rng(config.seed)
  b = config.batch_size
  batch = {
    "image": random_images(b, spec, rng),
    "label": rng.integers(0, num_classes, (b,), dtype=np.int32),
  }
  if config.mode == "finetune":  # the 'finetune' augmentation's soft targets
    batch["label_soft"] = np.full((b, num_classes), 1.0 / num_classes, np.float32)
  if cnn_finetune.is_cnn(config):
    return Synthetic(
      "finetune", task, batch, cnn_finetune.synthetic_info(config, num_classes), notes
    )
  info = {
    "image_size": spec.image_size,
    "fused_attention": bool(config.model.fused_attention),
    "remat": bool(config.model.remat),
    "scan_blocks": bool(config.model.scan_blocks),
    "model": f"ViT w{spec.width} d{spec.depth} h{spec.num_heads} p{spec.patch_size}, "
    f"{num_classes} classes, {config.mode}"
    + (f", kd {config.kd.type} from {config.kd.teacher.variant}" if teacher else ""),
  }
  return Synthetic("finetune", task, batch, info, notes)


# -----------------------------------------------------------------------------
# 6. Run
# -----------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir, *, mesh=None, lineage: dict | None = None):
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
  found = train_data.num_classes
  num_classes = config.num_classes or found
  if not num_classes:
    raise ValueError(f"dataset {config.data.name} has no class labels; set --config.num_classes")
  if found and config.num_classes and config.num_classes < found:
    # a label >= num_classes one-hot encodes to zeros: those images would
    # train towards no class and count as wrong, silently
    raise ValueError(
      f"num_classes={config.num_classes} is fewer than the {found} classes of "
      f"{config.data.name}; set --config.num_classes={found} (or 0: from the dataset)"
    )
  if num_classes < 2:
    raise ValueError(
      f"dataset {config.data.name} has {num_classes} class: a classifier needs at least 2 "
      "(a folder dataset needs a folder per class)"
    )
  model = build_model(config, num_classes)
  teacher = teacher_variables = teacher_record = None
  if config.kd.type != "none":  # before anything compiles: its errors come first
    teacher, teacher_variables, teacher_record = load_kd_teacher(config, num_classes)
  parent = None
  if config.init.source and workdir_lib.has_checkpoints(workdir):
    # A resume: the weights come from the checkpoint, the lineage from before.
    parent = (workdir_lib.read_json(workdir, workdir_lib.LINEAGE) or {}).get("parent")
  pretrained = None
  if config.init.source and parent is None:
    pretrained, parent = init_from_source(abstract_params(model), config)

  def apply_eval(variables, images):
    return model.apply(variables, normalize(images))

  evaluator = make_evaluator(apply_eval, eval_data, num_classes=num_classes)
  teacher_metrics = {}
  if teacher is not None:
    teacher_metrics = make_evaluator(
      lambda v, x: teacher.apply(v, normalize(x)), eval_data, num_classes=num_classes
    )(teacher_variables)
    log.info("kd teacher %s: eval %s", config.kd.teacher.source, teacher_metrics)
  confusion_of_params: list = [None]  # the last evaluation's, not the EMA's

  def evaluate(state):
    metrics = evaluator({"params": state.params, **state.model_state})
    confusion_of_params[0] = evaluator.last_confusion
    if state.ema is not None:  # the EMA weights, evaluated alongside
      ema = evaluator({"params": state.ema, **state.model_state})
      metrics.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
    return metrics

  task = build_task(
    config,
    model,
    train_data.steps_per_epoch,
    pretrained=pretrained,
    evaluate=evaluate,
    teacher=teacher,
    teacher_variables=teacher_variables,
  )
  record = {"stage": config.mode, "parent": parent}
  if teacher_record is not None:
    record["kd_teacher"] = teacher_record
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
  if config.figures:
    # Learning curves and the eval confusion matrix of the final state.
    from mimdistill.visualize import confusion, curves

    counts = confusion_of_params[0]  # of the final evaluation: no second pass
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
  final = result.metrics
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
    "kd_type": config.kd.type,
    "kd_teacher_top1": teacher_metrics.get("top1"),
  }
