r"""python launch/train.py --config configs/segment.py:quickstart --workdir workdirs/quickstart/segment

Stage 4: semantic segmentation with TinyMIM's mmseg UperNet (BEiT-style ViT
backbone with relative position bias and layer scale, necks to strides
4/8/16/32, UPerHead + FCNHead auxiliary head, pixel cross-entropy with
ignore index 255, AdamW with TinyMIM's layer-decay groups, mmcv's poly
schedule with linear warmup by iteration, sliding-window mIoU). The
encoder comes from `init.source`: a stage-2/3 workdir (`W` or `W:step`) or
an official / timm ViT `.pth` (the backbone's new parts are initialised
and logged), or a whole segmentor: an official mmseg checkpoint
(`{'meta', 'state_dict'}` with `backbone.*`, `decode_head.*`,
`auxiliary_head.*`), a converted one or a stage-4 workdir.

Presets (`:<arg>`):
  quickstart    the quickstart student (48-wide, depth 4, patch 4) from
                workdirs/quickstart/distill on the embedded segmentation
                scenes (11 classes, 64 px), crops of 32; about 1.5 minutes
                on 2 CPU cores
  ade20k_b      TinyMIM-B (configs/mae/upernet_mae_base_12_512_slide_160k_
                ade20k.py): ViT-B/16 at 512, layer scale 1.0, relative
                position bias, drop path 0.1, out_indices (3, 5, 7, 11),
                UPerHead 768 channels, FCNHead 256 (weight 0.4); AdamW lr
                1e-4, betas (0.9, 0.999), wd 0.05, layer decay 0.75; poly
                (power 1, min_lr 0) with 1500 linear warmup iterations
                (ratio 1e-6); 160k iterations at batch 16; crop 512, slide
                inference stride 341; ADE20K (data.name=ade20k:<root of
                ADEChallengeData2016>, reduce_zero_label, 150 classes)
  ade20k_t      TinyMIM-T: ViT-T/16 (192 wide, 3 heads) with the B recipe
                and decoder (the official repository has no TinyMIM-T
                segmentation config: layer decay 0.8 as its T-size config)
  ade20k_tstar  TinyMIM*-T (configs of Segmentation/TinyMIMstar-T): 192
                wide, 12 heads, distillation token, the extra 1280-wide
                layer after block 11 and the 4D-channel necks; layer decay 0.8
Sources: `--config.init.source=W/distill` (a distilled student),
`W/finetune`, `mae_pretrain_vit_base.pth`, `tinymim_b_ade20k.pth` (a
whole mmseg segmentor). In a pipeline, `parent` names the stage whose
workdir is the source (e.g. 'distill': a sibling of fine-tuning).
Override anything: --config.total_steps=8000 --config.eval.mode=whole ...
"""

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common as cc

# mmseg's ImageNet normalisation of the ADE20K configs (RGB).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = cc.stage_config(
    "segment",
    arg,
    batch_size=16,
    total_epochs=0.0,
    warmup_epochs=0.0,
    base_lr=1.6e-3,  # lr = base_lr * batch / 256 when `lr` is 0: 1e-4 at batch 16
    min_lr=0.0,
    optimizer=dict(
      b1=0.9,
      b2=0.999,
      weight_decay=0.05,
      layer_decay=0.75,
      # 'official': TinyMIM's constructor decays pos_embed, cls_token and
      # the relative-position tables (its exemption never matches);
      # 'intended': exempts them (BEiT's intent).
      no_decay="official",
    ),
    data=dict(
      img_scale=(2048, 512),
      ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75,
      flip_prob=0.5,
      photometric=True,
      reduce_zero_label=True,
      mean=MEAN,
      std=STD,
      # Eval canvases, (short, long) sides of the resized images and of the
      # original-size labels; unset: measured on the eval split.
      eval_pad_size=placeholder(tuple),
      eval_label_pad_size=placeholder(tuple),
    ),
  )
  c.data.update(
    name="ade20k:ADEChallengeData2016",
    train_split="training",
    eval_split="validation",
    image_size=512,  # the training crop (= model.image_size)
  )
  c.total_steps = 160_000
  c.lr = 1e-4
  c.warmup_steps = 1500  # mmcv's warmup_iters (linear, by iteration)
  c.schedule = ml_collections.ConfigDict(dict(power=1.0, warmup="linear", warmup_ratio=1e-6))
  c.num_classes = 150
  c.loss_weights = ml_collections.ConfigDict(dict(decode=1.0, aux=0.4))
  c.init = ml_collections.ConfigDict(dict(source=""))
  c.parent = ""  # pipeline: the stage whose workdir is init.source ('' = the previous one)
  c.model = cc.model_section(
    "base",
    image_size=512,
    drop_path=0.1,
    layer_scale=1.0,  # the official init_values
    rel_pos_bias=True,
    qkv_bias="fused",
    pos_embed_type="learned",
    out_indices=(3, 5, 7, 11),
    neck="tinymim",  # 'tinymim_star' for TinyMIM*-T
    fc_dim=1280,  # TinyMIM*-T's extra layer
    decode_head=dict(channels=768, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1),
    auxiliary_head=dict(
      channels=256, in_index=2, num_convs=1, concat_input=False, dropout_ratio=0.1
    ),
    fused_attention=False,
    remat=False,
    scan_blocks=False,
  )
  c.eval = ml_collections.ConfigDict(dict(mode="slide", stride=(341, 341)))
  c.eval_batch_size = 8
  c.eval_every = 16_000
  c.checkpoint_every = 16_000
  c.log_every = 50
  c.figures = True  # predictions.png (image / ground truth / prediction) at the end
  c.num_pictures = 4
  return c


def _ade20k_b(c):
  c.model.variant = "base"


def _ade20k_t(c):
  c.model.variant = "tiny"
  c.optimizer.layer_decay = 0.8


def _ade20k_tstar(c):
  cc.custom(c.model, 192, 12, 12, 16, 512)
  c.model.neck = "tinymim_star"
  c.optimizer.layer_decay = 0.8


def _quickstart(c):
  cc.custom(c.model, 48, 4, 3, 4, 32)  # the distilled quickstart student
  c.model.out_indices = (0, 1, 2, 3)
  c.model.decode_head.channels = 32
  c.model.auxiliary_head.channels = 16
  c.init.source = "workdirs/quickstart/distill"
  c.parent = "distill"
  # 64 px scenes: ADE20K's recipe scaled by 1/16 (short side 32 * U(0.5, 2),
  # crops of 32, eval resize to 32 and scoring at 64).
  c.data.update(
    name="embedded_segmentation",
    train_split="train",
    eval_split="test",
    image_size=32,
    img_scale=(128, 32),
    reduce_zero_label=False,
    num_workers=0,
  )
  c.num_classes = 11
  c.batch_size = 16
  # A few hundred iterations instead of 160k: a higher lr and a milder layer
  # decay, so that the small heads and encoder move within the budget.
  c.total_steps = 300
  c.lr = 8e-3
  c.optimizer.layer_decay = 0.9
  c.warmup_steps = 20
  c.eval.stride = (21, 21)
  c.eval_batch_size = 40
  c.eval_every = 0
  c.checkpoint_every = 150
  c.log_every = 20


PRESETS = {
  "quickstart": _quickstart,
  "ade20k_b": _ade20k_b,
  "ade20k_t": _ade20k_t,
  "ade20k_tstar": _ade20k_tstar,
}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(arg, name="segment", common=base_config, presets=PRESETS, default="quickstart")
