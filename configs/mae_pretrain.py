r"""python launch/train.py --config configs/mae_pretrain.py:quickstart --workdir /tmp/mae

Stage 1, MAE pre-training. Presets (`:<arg>`):
  quickstart  tiny ViT on the embedded shapes dataset, minutes on a CPU
  cifar10     ViT-T-sized at 32 px on class folders (set data.name=folder:<root>)
  base|large|huge  the official MAE recipe on ImageNet-1K (TFDS imagenet2012):
              800 epochs, 40 warmup, batch 4096, blr 1.5e-4, betas (0.9, 0.95),
              wd 0.05, mask 0.75, norm_pix_loss, decoder 512-d x 8 blocks
Override anything: --config.total_epochs=5 --config.batch_size=256 ...
"""

import ml_collections

from configs import common as cc


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = cc.stage_config(
    "pretrain",
    arg,
    batch_size=4096,
    total_epochs=800,
    warmup_epochs=40,
    base_lr=1.5e-4,
    min_lr=0.0,
    optimizer=dict(b1=0.9, b2=0.95, weight_decay=0.05),
    data=dict(crop_scale=(0.2, 1.0)),
  )
  c.mask_ratio = 0.75
  c.norm_pix_loss = True
  c.model = cc.model_section(
    "large",
    drop_path=0.0,
    fused_attention=False,  # jax.nn.dot_product_attention (cuDNN on GPU)
    remat=False,  # recompute each block in the backward pass
    scan_blocks=False,  # lax.scan over blocks: faster compile
    decoder=dict(width=512, depth=8, num_heads=16),
  )
  c.num_visualize = 8  # reconstructions.png rows
  return c


def _quickstart(c):
  cc.custom(c.model, 64, 4, 4, 4, 32)
  c.model.decoder.update(width=64, depth=2, num_heads=4)
  c.data.update(
    name="embedded", train_split="train", eval_split="test", image_size=32, num_workers=0
  )
  c.batch_size = 128
  c.total_epochs = 12.0
  c.warmup_epochs = 1.0
  c.base_lr = 1.5e-4 * 8  # small models on little data like a higher lr
  c.log_every = 10
  c.checkpoint_every = 100


def _cifar10(c):
  cc.custom(c.model, 192, 12, 3, 4, 32)
  c.model.decoder.update(width=128, depth=2, num_heads=4)
  c.data.update(
    name="folder:../shared/data/cifar10",
    train_split="train",
    eval_split="test",
    image_size=32,
    num_workers=2,
  )
  c.batch_size = 256
  c.total_epochs = 100.0
  c.warmup_epochs = 5.0
  c.log_every = 20
  c.checkpoint_every = 500


def _variant(name):
  def edit(c):
    c.model.variant = name

  return edit


PRESETS = {
  "quickstart": _quickstart,
  "cifar10": _cifar10,
  **{v: _variant(v) for v in ("base", "large", "huge")},
}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(
    arg, name="mae_pretrain", common=base_config, presets=PRESETS, default="quickstart"
  )
