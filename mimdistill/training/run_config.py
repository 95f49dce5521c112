"""Reading the run fields every stage config shares (made by
`configs/common.py:stage_config`): the peak learning rate, the step counts,
the input pipeline's config and the loop's."""

from __future__ import annotations

import ml_collections

from mimdistill.training.loop import LoopConfig


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
