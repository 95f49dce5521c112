r"""python launch/train.py --config configs/cae.py:quickstart --workdir workdirs/quickstart/cae

CAE v2 pre-training (Context Autoencoder with CLIP target, arXiv 2211.09799,
official Atten4Vis/CAE `tools/run_pretraining.py --model_type caev2`): the
student encodes the visible patches of a block-masked image, a
cross-attention regressor predicts the masked latents, and one shared
LayerNorm + Linear head aligns CLS, visible and masked tokens with a frozen
teacher's tokens on the whole image (mean 1 - cos over all tokens).

The teacher (`teacher.source`) is a CLIP image tower file (OpenAI's released
`.pt`, an open_clip or OpenAI state dict) or any mimdistill ViT teacher: a
stage-1 / stage-2 workdir (`W` or `W:step`) or an official MAE / TinyMIM
`.pth`; `teacher.type='auto'` tells them apart by the names in the file.

Presets (`:<arg>`):
  quickstart  the stage-1 quickstart teacher (configs/mae_pretrain.py:quickstart,
              default source workdirs/quickstart/pretrain) -> a 48-wide student
              on the embedded dataset, 10 of 64 patches masked (ViT-T's
              30 / 196); about 3 minutes on 2 CPU cores
  cifar10     the mae_pretrain.py:cifar10 teacher -> a 96-wide student on class
              folders (set data.name=folder:<root>)
  tiny|small|base  the official recipe with CLIP ViT-B/16 (teacher.source=
              ViT-B-16.pt, 512-wide tokens): 300 epochs, 10 warmup, batch 2048,
              AdamW (0.9, 0.999) at lr 1.5e-3 ABSOLUTE (not scaled by batch),
              min lr 1e-5 (BEiT cosine table), wd 0.05 (cls_token and mask_token
              decayed), clip 3.0, drop path 0.1, layer scale 0.1, crop
              (0.4, 1.0) + colour jitter 0.4; 12 heads at every size (ViT-T
              too); masked patches 30 / 49 / 98 of 196; regressor 96 x 1 (T,
              with a 192 -> 96 projection), 384 x 1 (S), 768 x 4 (B), 12 heads.
              Fine-tune with configs/finetune.py:cae_<size>. The default: base.
Override anything: --config.teacher.source=W/pretrain --config.mask.num_patches=20 ...
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common as cc

# Official CAE v2 scripts (project/CAEv2/scripts/caev2_<size>_300e.sh): the
# regressor (--decoder_embed_dim, --regressor_depth) and --num_mask_patches.
OFFICIAL = {
  "tiny": dict(regressor=(96, 1), masked=30),
  "small": dict(regressor=(384, 1), masked=49),
  "base": dict(regressor=(768, 4), masked=98),
}


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = cc.stage_config(
    "cae",
    arg,
    batch_size=2048,
    total_epochs=300,
    warmup_epochs=10,
    base_lr=1.5e-3 * 256 / 2048,  # used only with lr=0 (then scaled by batch / 256)
    min_lr=1e-5,
    optimizer=dict(b1=0.9, b2=0.999, weight_decay=0.05),
    data=dict(crop_scale=(0.4, 1.0), color_jitter=0.4),
  )
  c.optimizer.clip_grad_norm = 3.0
  c.lr = 1.5e-3  # the official --lr is absolute
  # The trained student: CAE's ViT (BEiT-style layer scale, q/v biases, CAE's
  # fixed sin-cos position embedding; 12 heads at every official size) and
  # the latent regressor (the official script builds it with 12 heads and
  # layer scale 0.1 whatever its flags say).
  c.model = cc.model_section(
    "base",
    drop_path=0.1,
    layer_scale=0.1,
    qkv_bias="qv",
    fused_attention=False,  # jax.nn.dot_product_attention (cuDNN on GPU)
    remat=False,  # recompute each block in the backward pass
    scan_blocks=False,  # lax.scan over the encoder blocks: faster compile
    regressor=dict(width=768, depth=4, num_heads=12, layer_scale=0.1),
  )
  c.model.num_heads = 12
  # Block-wise masking (BEiT / CAE MaskingGenerator). num_patches 0: the
  # official count of model.variant (tiny / small / base), scaled by area to
  # the student's patch grid.
  c.mask = ml_collections.ConfigDict(
    dict(
      num_patches=0,
      min_patches_per_block=16,
      max_patches_per_block=placeholder(int),  # None: up to num_patches
      min_aspect=0.3,  # aspect ratios in [min_aspect, 1 / min_aspect]
    )
  )
  # The frozen teacher. type: 'auto' (a workdir is a ViT; a file is read and
  # told apart by its names), 'clip' or 'vit'. The architecture fields
  # describe it (a workdir's record or a CLIP file's shapes fill a 'custom'
  # section and must agree with a named variant); image_size is the
  # resolution it runs at (the crop's: CLIP's position embedding is resized
  # to it). CLIP: heads are num_heads (OpenAI: width // 64), output_dim its
  # projection width (0: the file's), act its MLP activation. ViT: tokens at
  # `block` (1-based; 0: the last, after the final norm, or block 18 of a
  # depth-24 teacher as in TinyMIM); layer_scale / qkv_bias for a CAE
  # teacher workdir.
  c.teacher = cc.model_section(
    "base",
    type="auto",
    source="ViT-B-16.pt",
    output_dim=512,
    act="quick_gelu",
    block=0,
    layer_scale=placeholder(float),
    qkv_bias=placeholder(str),
    fused_attention=False,
    scan_blocks=False,
  )
  c.loss_weight = 1.0  # --latent_alignment_loss_weight
  return c


def _official(size: str):
  def edit(c):
    width, depth = OFFICIAL[size]["regressor"]
    c.model.variant = size
    c.model.num_heads = 12
    c.model.regressor.update(width=width, depth=depth)
    c.mask.num_patches = OFFICIAL[size]["masked"]

  return edit


def _vit_teacher(c, width: int, depth: int, heads: int, patch: int, image: int, source: str):
  cc.custom(c.teacher, width, depth, heads, patch, image)
  c.teacher.update(type="vit", source=source, output_dim=0)


def _quickstart(c):
  # Teacher = configs/mae_pretrain.py:quickstart's encoder (README command 1);
  # student = the quickstart fine-tuning model (48 wide, 3 heads).
  _vit_teacher(c, 64, 4, 4, 4, 32, "workdirs/quickstart/pretrain")
  cc.custom(c.model, 48, 4, 3, 4, 32)
  c.model.regressor.update(width=48, depth=1)
  # ViT-T's 30 and 16 of 196 patches, scaled to the 8 x 8 grid.
  c.mask.update(num_patches=10, min_patches_per_block=5)
  c.data.update(
    name="embedded", train_split="train", eval_split="test", image_size=32, num_workers=0
  )
  c.batch_size = 128
  c.total_epochs = 7.0  # as the quickstart distillation: equal budget
  c.warmup_epochs = 1.0
  c.log_every = 10
  c.checkpoint_every = 100


def _cifar10(c):
  _vit_teacher(c, 192, 12, 3, 4, 32, "")  # configs/mae_pretrain.py:cifar10
  cc.custom(c.model, 96, 12, 3, 4, 32)
  c.model.regressor.update(width=96, depth=1)
  c.mask.update(num_patches=10, min_patches_per_block=5)
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


PRESETS = {
  "quickstart": _quickstart,
  "cifar10": _cifar10,
  **{size: _official(size) for size in OFFICIAL},
}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(arg, name="cae", common=base_config, presets=PRESETS, default="base")
