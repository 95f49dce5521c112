"""The run-level fields every stage config shares: made by `stage_config`,
read by the functions below.

Shared fields: `seed`, `batch_size` (global), `total_epochs` or
`total_steps`, `warmup_epochs`, `base_lr` (scaled by batch/256) or `lr`,
`min_lr`, `dtype`, `optimizer`, `data`, `mesh`, `log_every`,
`checkpoint_every`, `keep_checkpoints`.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from mimdistill.training.loop import LoopConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def stage_config(
  stage: str,
  preset: str,
  *,
  batch_size: int,
  total_epochs: float,
  warmup_epochs: float,
  base_lr: float,
  min_lr: float,
  optimizer: dict,
  data: dict,
) -> ml_collections.ConfigDict:
  """A stage config's shared fields, with the official ImageNet defaults;
  `optimizer` and `data` add the stage's own entries to those sections. The
  stage config then adds its model and method fields."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.preset = preset
  c.seed = 0
  c.dtype = "float32"  # compute dtype; 'bfloat16' on TPU/GPU
  c.batch_size = batch_size  # global, over all hosts and devices
  c.total_epochs = float(total_epochs)
  c.total_steps = 0  # > 0 overrides total_epochs
  c.warmup_epochs = float(warmup_epochs)
  c.base_lr = base_lr  # lr = base_lr * batch_size * accumulate_steps / 256
  c.lr = 0.0  # > 0 sets the peak lr directly
  c.min_lr = min_lr
  c.optimizer = ml_collections.ConfigDict(dict(clip_grad_norm=0.0, accumulate_steps=1, **optimizer))
  c.data = ml_collections.ConfigDict(
    dict(
      name="imagenet2012",
      data_dir=placeholder(str),
      train_split="train",
      eval_split="validation",
      image_size=224,
      num_workers=8,
      **data,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1, num_devices=0))  # 0 = all
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  return c


def compute_dtype(config: ml_collections.ConfigDict):
  name = config.get("dtype", "float32")
  if name not in _DTYPES:
    raise ValueError(f"dtype={name!r} is not one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def peak_lr(config: ml_collections.ConfigDict) -> float:
  """`lr` if given, else the official linear scaling `base_lr * batch / 256`
  with the effective batch: `batch_size` times the gradient accumulation."""
  if config.get("lr"):
    return float(config.lr)
  accumulate = int((config.get("optimizer") or {}).get("accumulate_steps", 1) or 1)
  return float(config.base_lr) * config.batch_size * accumulate / 256


def steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
  """(total, warmup) optimizer steps from epochs (or `total_steps`)."""
  if steps_per_epoch < 1:
    raise ValueError(
      f"batch_size={config.batch_size} is larger than the training split; lower the batch size"
    )
  if config.get("total_steps"):
    total = int(config.total_steps)
  else:
    total = int(round(config.total_epochs * steps_per_epoch))
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total - 1, 0))
  return total, warmup


def data_config(
  config: ml_collections.ConfigDict, augment: str, batch_size: int | None = None
) -> ml_collections.ConfigDict:
  """The input pipeline's config: the stage's `data` section plus the global
  batch (default `config.batch_size`), the augmentation and the seed."""
  data = config.data.to_dict()
  data.update(batch_size=batch_size or config.batch_size, augment=augment, seed=config.seed)
  if config.get("num_classes"):
    data["num_classes"] = config.num_classes  # soft labels sized like the head
  return ml_collections.ConfigDict(data)


def loop_config(config: ml_collections.ConfigDict) -> LoopConfig:
  return LoopConfig(
    seed=config.seed,
    fsdp=config.mesh.fsdp,
    log_every=config.log_every,
    checkpoint_every=config.checkpoint_every,
    keep_checkpoints=config.keep_checkpoints,
    async_checkpoints=config.get("async_checkpoints", True),
    eval_every=config.get("eval_every", 0),
  )
