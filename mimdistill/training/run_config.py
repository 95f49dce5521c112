"""Reading the run fields every stage config shares (made by
`configs/common.py:stage_config`): the peak learning rate, the step counts,
the input pipeline's config and the loop's."""

from __future__ import annotations

import math

import ml_collections

from mimdistill.training.loop import LoopConfig


def _number(config, field: str, value, *, minimum: float, strict: bool = False, fix: str) -> None:
  ok = isinstance(value, (int, float)) and math.isfinite(value)
  ok = ok and (value > minimum if strict else value >= minimum)
  if not ok:
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    raise ValueError(f"{field}={value!r} must be a finite number {bound}; {fix}")


def validate(config: ml_collections.ConfigDict) -> None:
  """The shared run fields, checked before any data is read or anything
  compiles: each error names the field and the fix."""
  for field in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    value = config[field]
    if not isinstance(value, int) or value < 1:
      extra = " (0 would let Orbax delete every checkpoint)" if field == "keep_checkpoints" else ""
      raise ValueError(f"{field}={value!r} must be an integer >= 1{extra}")
  if not isinstance(config.eval_every, int) or config.eval_every < 0:
    raise ValueError(f"eval_every={config.eval_every!r} must be an integer >= 0 (0: at the end)")
  if not isinstance(config.total_steps, int) or config.total_steps < 0:
    raise ValueError(f"total_steps={config.total_steps!r} must be an integer >= 0 (0: epochs)")
  if not config.total_steps:
    _number(
      config, "total_epochs", config.total_epochs, minimum=0, strict=True, fix="or set total_steps"
    )
  _number(config, "warmup_epochs", config.warmup_epochs, minimum=0, fix="0 disables warmup")
  if config.lr:
    _number(
      config,
      "lr",
      config.lr,
      minimum=0,
      strict=True,
      fix="a negative lr is gradient ascent; use 0 to take base_lr * batch / 256",
    )
  else:
    _number(config, "base_lr", config.base_lr, minimum=0, strict=True, fix="or set lr directly")
  _number(config, "min_lr", config.min_lr, minimum=0, fix="the cosine decays to it")
  peak = peak_lr(config)
  if config.min_lr > peak:
    raise ValueError(
      f"min_lr={config.min_lr:g} is above the peak lr {peak:g} (lr or base_lr * batch / 256): "
      "the 'decay' would rise; lower min_lr"
    )
  o = config.optimizer
  if not isinstance(o.accumulate_steps, int) or o.accumulate_steps < 1:
    raise ValueError(f"optimizer.accumulate_steps={o.accumulate_steps!r} must be an integer >= 1")
  _number(config, "optimizer.clip_grad_norm", o.clip_grad_norm, minimum=0, fix="0 disables it")
  _number(config, "optimizer.weight_decay", o.weight_decay, minimum=0, fix="0 disables it")


def peak_lr(config: ml_collections.ConfigDict) -> float:
  """`lr` if given, else the official linear scaling `base_lr * batch / 256`
  with the effective batch: `batch_size` times the gradient accumulation."""
  if config.lr:
    return float(config.lr)
  accumulate = int(config.optimizer.accumulate_steps or 1)
  return float(config.base_lr) * config.batch_size * accumulate / 256


def steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
  """(total, warmup) optimizer steps from epochs (or `total_steps`)."""
  if steps_per_epoch < 1:
    raise ValueError(
      f"batch_size={config.batch_size} is larger than the training split; lower the batch size"
    )
  if config.total_steps:
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
    log_every=config.log_every,
    checkpoint_every=config.checkpoint_every,
    keep_checkpoints=config.keep_checkpoints,
    async_checkpoints=config.async_checkpoints,
    eval_every=config.eval_every,
  )
