r"""python launch/train.py --config configs/hetero_distill.py:quickstart --workdir workdirs/hetero_quickstart/hetero

Heterogeneous (H-GKD-style) distillation of a frozen MIM ViT teacher into a
sparse CNN student. The teacher (`teacher.source`: a stage-1/2 workdir `W` or
`W:step`, or an official / timm ViT `.pth`) sees the whole crop and gives its
patch tokens after block `teacher.block` (run only that far); the CNN sees
the SparK-masked crop (mask on the stride-32 grid); its decoder map at the
teacher's patch stride goes through a 1x1 projection to the teacher width and
regresses the LayerNorm-whitened teacher tokens on the chosen positions,
optionally plus SparK's pixel loss. The teacher's patch size must divide 32
(each mask cell covers (32 / patch)^2 teacher patches). H-GKD (arXiv
2309.09571) published no code: the head, the loss and the defaults here are
mimdistill's design.

Presets (`:<arg>`):
  quickstart     the hetero quickstart's stage-1 teacher (a 64-wide ViT, patch
                 8 at 64 px; configs/pipeline.py:hetero_quickstart trains it in
                 workdirs/hetero_quickstart/pretrain) -> a narrow ResNet-18
                 (every width / 4) on the embedded dataset at 64 px
  resnet50_from_base   MAE ViT-B/16 (teacher.source=mae_pretrain_vit_base.pth,
                 last block) -> ResNet-50, ImageNet-1K: 300 epochs, 10 warmup,
                 batch 4096, SparK's optimizer (LAMB (0.9, 0.95), blr 2e-4,
                 clip 5, wd 0.04 -> 0.2), mask 0.6, decoder width 768
  resnet50_from_large  MAE ViT-L/16, block 18 of 24 -> ResNet-50
  convnext_tiny_from_base  MAE ViT-B/16 -> ConvNeXt-T (LAMB (0.9, 0.999))
Modifiers (after a preset, comma-separated): masked, visible, all (positions
of the feature loss), mse (instead of smooth-L1), pixel (+ SparK's pixel loss,
weight 1), block<k> (teacher block, 1-based).
Override anything: --config.hetero.pixel_weight=0.5 --config.teacher.block=8 ...
"""

import ml_collections

from configs import common as cc
from configs import spark_pretrain


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = spark_pretrain.base_config(arg)
  c.stage = "hetero_distill"
  c.total_epochs = 300.0
  c.warmup_epochs = 10.0
  # The frozen ViT teacher: architecture, weights, target block (1-based;
  # 0 = 18 for a depth-24 teacher, else its last, as stage 2).
  c.teacher = cc.model_section(
    "base",
    source="",
    block=0,
    fused_attention=False,  # jax.nn.dot_product_attention in its blocks
    scan_blocks=False,  # not supported here (refused)
  )
  c.hetero = ml_collections.ConfigDict(
    dict(
      positions="all",  # tokens the feature loss counts: 'masked' | 'visible' | 'all'
      loss="smooth_l1",  # 'smooth_l1' | 'mse'
      beta=2.0,  # smooth-L1 beta (stage 2's feature target uses 2.0)
      pixel_weight=0.0,  # > 0: + weight * SparK's pixel loss (full decoder)
    )
  )
  c.num_visualize = 8  # rows of hetero_maps.png (0: none)
  return c


def _quickstart(c):
  spark_pretrain.quickstart_student(c)
  # The stage-1 teacher of configs/pipeline.py:hetero_quickstart.
  cc.custom(c.teacher, 64, 4, 4, 8, 64)
  c.teacher.source = "workdirs/hetero_quickstart/pretrain"


def _pair(teacher: str, family: str, block: int = 0):
  def edit(c):
    c.teacher.variant = teacher
    c.teacher.block = block
    if family == "convnext":
      c.model.update(family="convnext", depth=None, variant="tiny")
      c.optimizer.b2 = 0.999
    else:
      c.model.update(family="resnet", depth=50)

  return edit


PRESETS = {
  "quickstart": _quickstart,
  "resnet50_from_base": _pair("base", "resnet"),
  "resnet50_from_large": _pair("large", "resnet", 18),
  "convnext_tiny_from_base": _pair("base", "convnext"),
}


def _set(**fields):
  def edit(c):
    c.hetero.update(fields)

  return edit


def _block(c, k: str):
  c.teacher.block = int(k)


MODIFIERS = {
  "masked": _set(positions="masked"),
  "visible": _set(positions="visible"),
  "all": _set(positions="all"),
  "mse": _set(loss="mse"),
  "pixel": _set(pixel_weight=1.0),
}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(
    arg,
    name="hetero_distill",
    common=base_config,
    presets=PRESETS,
    default="quickstart",
    modifiers=MODIFIERS,
    prefixed={"block": _block},
  )
