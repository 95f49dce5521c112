r"""python launch/train.py --config configs/spark_pretrain.py:quickstart --workdir workdirs/hetero_quickstart/spark

SparK pixel pre-training of a CNN (keyu-tian/SparK `pretrain/main.py`): the
sparse encoder sees the masked image (mask on the stride-32 grid, 60% of the
cells removed), densify + LightDecoder reconstruct the per-patch normalised
pixels, the loss counts the masked patches only. The workdir is an init
source for CNN fine-tuning (`configs/finetune.py:cnn_*`).

Presets (`:<arg>`):
  quickstart      a narrow ResNet-18 (every width / 4) on the embedded dataset
                  at 64 px (2x2 mask grid); the SparK-only baseline of
                  configs/pipeline.py:hetero_quickstart
  resnet50        SparK's ResNet-50 recipe on ImageNet-1K: batch 4096, 1600
                  epochs, 40 warmup, blr 2e-4 (lr = blr * batch / 256), LAMB
                  (0.9, 0.95) with global clipping 5, wd 0.04 -> 0.2 (cosine),
                  mask 0.6, decoder width 768, BatchNorm densify
  convnext_tiny   the same with ConvNeXt-T (LAMB (0.9, 0.999), LayerNorm densify)
The lr follows SparK's schedule (`training/spark_schedules.py`: linear warmup
from 0.5% of the peak, cosine to 0.1% of it); `min_lr` is not read.
Override anything: --config.total_epochs=5 --config.model.depth=34 ...
"""

import ml_collections

from configs import common as cc


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = cc.stage_config(
    "spark_pretrain",
    arg,
    batch_size=4096,
    total_epochs=1600,
    warmup_epochs=40,
    base_lr=2e-4,
    min_lr=0.0,
    optimizer=dict(
      name="lamb",  # 'lamb' | 'adamw'
      b1=0.9,
      b2=0.95,  # SparK: 0.95 for ResNets, 0.999 for ConvNeXts
      eps=1e-6,
      weight_decay=0.04,
      weight_decay_end=0.2,  # cosine from weight_decay to this over the run
      bias_correction=True,
      always_adapt=False,
      layer_decay_rule="extended",  # unused in pre-training (no layer decay)
    ),
    data=dict(crop_scale=(0.67, 1.0)),
  )
  c.optimizer.clip_grad_norm = 5.0
  c.mask_ratio = 0.6
  c.model = cc.cnn_section(
    "resnet",
    depth=50,
    drop_path=0.0,
    decoder_width=768,
    densify_norm="auto",  # 'auto': 'bn' for ResNets, 'ln' for ConvNeXts (SparK's choice)
  )
  c.num_visualize = 8  # rows of spark_reconstructions.png (0: none)
  return c


def quickstart_student(c) -> None:
  """The quickstart CNN student and data (shared with the hetero stage)."""
  c.model.update(family="resnet", depth=18, div=4, decoder_width=128, image_size=64)
  c.data.update(
    name="embedded", train_split="train", eval_split="test", image_size=64, num_workers=0
  )
  c.mask_ratio = 0.5  # 2 of the 4 cells of the 2x2 grid stay visible
  c.batch_size = 64
  c.total_epochs = 3.0
  c.warmup_epochs = 1.0
  c.base_lr = 2e-4 * 8  # small models on little data like a higher lr
  c.log_every = 10
  c.checkpoint_every = 200


def _resnet50(c):
  c.model.update(family="resnet", depth=50)


def _convnext_tiny(c):
  c.model.update(family="convnext", depth=None, variant="tiny")
  c.optimizer.b2 = 0.999


PRESETS = {"quickstart": quickstart_student, "resnet50": _resnet50, "convnext_tiny": _convnext_tiny}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(
    arg, name="spark_pretrain", common=base_config, presets=PRESETS, default="quickstart"
  )
