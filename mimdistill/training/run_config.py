"""Reading the run fields every stage config shares (made by
`configs/common.py:stage_config`): the peak learning rate, the step counts,
the input pipeline's config and the loop's."""

from __future__ import annotations

import logging
import math

import ml_collections

from mimdistill.data import input_pipeline
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
  for field in (
    "batch_size",
    "eval_batch_size",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
  ):
    if field not in config:  # eval_batch_size: the stages that evaluate
      continue
    value = config[field]
    if not isinstance(value, int) or value < 1:
      extra = " (0 would let Orbax delete every checkpoint)" if field == "keep_checkpoints" else ""
      raise ValueError(f"{field}={value!r} must be an integer >= 1{extra}")
  if "num_visualize" in config and (
    not isinstance(config.num_visualize, int) or config.num_visualize < 0
  ):
    # the pictures are drawn after the last step: a bad count would fail there
    raise ValueError(
      f"num_visualize={config.num_visualize!r} must be an integer >= 0 (0: no pictures)"
    )
  seed = config.get("seed")
  if seed is not None and (
    isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32
  ):
    # grain's shuffle and numpy's generators take 0..2**32-1; a negative seed
    # ("random" in some tools) would fail only when the input pipeline is built
    raise ValueError(
      f"seed={seed!r} must be an integer in [0, 2**32); every random choice is a function of it, "
      "so pick any fixed value (e.g. 0)"
    )
  if not isinstance(config.eval_every, int) or config.eval_every < 0:
    raise ValueError(f"eval_every={config.eval_every!r} must be an integer >= 0 (0: at the end)")
  if not isinstance(config.total_steps, int) or config.total_steps < 0:
    raise ValueError(f"total_steps={config.total_steps!r} must be an integer >= 0 (0: epochs)")
  if not config.total_steps:
    _number(
      config, "total_epochs", config.total_epochs, minimum=0, strict=True, fix="or set total_steps"
    )
  _number(config, "warmup_epochs", config.warmup_epochs, minimum=0, fix="0 disables warmup")
  if not config.total_steps and 0 < config.total_epochs <= config.warmup_epochs:
    raise ValueError(
      f"warmup_epochs={config.warmup_epochs:g} is not shorter than total_epochs="
      f"{config.total_epochs:g}: the lr would never reach its peak; lower warmup_epochs"
    )
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
  for field in ("crop_scale", "finetune_crop_scale"):
    scale = config.data.get(field)
    if scale is None:
      continue
    ok = isinstance(scale, (tuple, list)) and len(scale) == 2
    if not (
      ok and all(isinstance(v, (int, float)) for v in scale) and 0 < scale[0] <= scale[1] <= 1
    ):
      raise ValueError(
        f"data.{field}={scale!r} must be (low, high) with 0 < low <= high <= 1: the crop's area "
        "as a fraction of the image's, e.g. (0.2, 1.0)"
      )
  input_pipeline.check_loader_fields(config.data)
  for field in ("color_jitter", "finetune_color_jitter"):
    jitter = config.data.get(field)
    if jitter is not None:  # torchvision's ColorJitter strength, one for all three
      _number(config, f"data.{field}", jitter, minimum=0, fix="0 turns it off (MAE / TinyMIM: 0.4)")
  o = config.optimizer
  if not isinstance(o.accumulate_steps, int) or o.accumulate_steps < 1:
    raise ValueError(f"optimizer.accumulate_steps={o.accumulate_steps!r} must be an integer >= 1")
  _number(config, "optimizer.clip_grad_norm", o.clip_grad_norm, minimum=0, fix="0 disables it")
  _number(config, "optimizer.weight_decay", o.weight_decay, minimum=0, fix="0 disables it")
  for beta in ("b1", "b2"):
    # b2 = 1 makes Adam's bias correction 1 - b2**t zero: every update NaN.
    value = o.get(beta)
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
      raise ValueError(
        f"optimizer.{beta}={value!r} must be in [0, 1) (an exponential decay rate; the recipes "
        "use b1=0.9, b2=0.95 or 0.999)"
      )
  decay = o.get("layer_decay")
  if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay <= 1):
    raise ValueError(
      f"optimizer.layer_decay={decay!r} must be in (0, 1]: a layer's lr is scaled by "
      "layer_decay ** (its distance from the head), so 0 freezes the encoder and > 1 raises the "
      "lr of the lower layers; 1 disables it (linear probing is --config.mode=linprobe)"
    )


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
  if warmup > total - 1 > 0:
    # total_steps set by hand (a short trial of a long recipe): the trial
    # still runs, with the warmup cut to fit, and says so.
    logging.getLogger(__name__).warning(
      "warmup_epochs=%g is %d steps, not shorter than total_steps=%d: the warmup is cut to %d "
      "steps (set --config.warmup_epochs lower to choose it)",
      config.warmup_epochs,
      warmup,
      total,
      total - 1,
    )
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
