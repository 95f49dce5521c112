r"""python launch/train.py --config configs/finetune.py:quickstart --workdir workdirs/quickstart/finetune

Stage 3: fine-tuning (MAE main_finetune.py) or linear probing
(main_linprobe.py, `mode=linprobe`) of an encoder from `init.source`: a
stage-1/2/3 workdir (`W` or `W:step`) or an official `.pth`. The head count
is this config's (ViT-T: distilled with 6 heads, fine-tuned with 3); the
position embedding becomes learnable and is resized bicubically if the
resolution differs; a head of another class count is re-initialised.

Presets (`:<arg>`):
  quickstart  the quickstart student (48-wide, depth 4) on the embedded dataset
  cifar10     the cifar10 student on class folders
  tiny|small|base  the official recipes on ImageNet-1K (TFDS imagenet2012):
              AdamW (0.9, 0.999), wd 0.05, blr 5e-4 (lr = blr * batch / 256),
              batch 1024, warmup 5, cosine to 1e-6, layer decay 0.75 (T/S) /
              0.65 (B), drop path 0.1, RandAugment m9 mstd0.5, mixup 0.8,
              cutmix 1.0, label smoothing 0.1, random erasing 0.25;
              epochs 100 (B) / 200 (T, S)
  scratch     the paper's from-scratch baseline (no init.source, 300 epochs)
  cae_tiny|cae_small|cae_base  CAE v2's official per-size recipes
              (tools/run_class_finetuning.py, the CAEv2 scripts) for a
              configs/cae.py encoder (12 heads, layer scale 0.1, q/v biases):
              batch 1024, lr ABSOLUTE 4e-3 / 4e-4 / 2e-4, layer decay 0.85 /
              0.75 / 0.75, epochs 100 / 200 / 100, warmup 5 / 20 / 5, drop path
              0 / 0.1 / 0.1; T: RandAugment m10, mixup 0.2, no cutmix, no label
              smoothing. Not reproduced: the official relative position bias
              tables (zero-initialised, not in the pre-trained weights), its
              fixed sin-cos position embedding (learned here, from the
              pre-trained table), head init scale 0.001, warmup from 1e-6
  tiny_star   TinyMIM*-T on ImageNet-1K: the `star` model below fine-tuned for
              1000 epochs with hard knowledge distillation from a fine-tuned
              TinyMIM-B (kd.teacher.source, default workdirs/imagenet/finetune,
              the stage-3 workdir of configs/pipeline.py:imagenet)
  quickstart_star  the quickstart-sized TinyMIM*-T (48 wide, 12 heads,
              dist token, extra layer 256) from configs/tinymim_distill.py:
              quickstart,star, KD from the quickstart's fine-tuned student
              (workdirs/quickstart/finetune)
CNN students (init.source: a SparK / heterogeneous workdir or a timm .pth;
SparK's recipe, stages/cnn_finetune.py):
  cnn_quickstart      the hetero quickstart's ResNet-18 / 4 at 64 px
  cnn_resnet50|cnn_resnet101  LAMB (no bias correction), BCE, batch 2048,
              300 epochs, 5 warmup, blr 2e-3 / 1e-3, layer decay 0.7 / 0.8,
              wd 0.02, mixup 0.1, cutmix 1.0, smoothing 0.1, EMA 0.9999,
              drop path 0.05 / 0.2, eval crop 0.95
  cnn_convnext_tiny|cnn_convnext_small  AdamW, CE, batch 4096, 400 epochs,
              blr 2e-4, layer decay 0.7, wd 0.01, mixup 0.8, drop path 0.1 / 0.3
Modifiers (appended with commas):
  linprobe    linear probing (LARS, blr 0.1, batch 16384, 90 epochs, frozen
              encoder, BatchNorm without affine before the head)
  star        the TinyMIM*-T architecture on the preset's model: 12 heads,
              DeiT's distillation token and `head_dist`, the extra layer
              LayerNorm(1e-5) -> Linear(D -> 1280) -> GELU on all tokens
  kd_<type>   knowledge distillation type none | soft | hard
  cae         a configs/cae.py encoder's layout (layer scale, q/v biases)
Override anything: --config.init.source=W/distill --config.total_epochs=50 ...

Knowledge distillation (`kd`, DeiT `DistillationLoss`, exact): loss =
base * (1 - alpha) + kd * alpha with base = soft-target cross-entropy of the
CLS head (mixup / cutmix / smoothing targets), kd = KL(teacher || dist head)
at temperature tau times tau^2 / (batch * classes) ('soft') or the dist
head's cross-entropy against the teacher's argmax ('hard'). A model without
a distillation token uses its one head for both terms (as G2SD does). The
teacher (`kd.teacher`: its architecture, `source` = a stage-3 workdir or its
`best/`, an official MAE fine-tuned `.pth`, a timm ViT `.pth` /
`.safetensors`) is frozen, in eval mode, sees the same mixed images, and is
never saved nor optimised.

Our choices where DeiT and TinyMIM are silent (TinyMIM never published its
KD settings; DeiT's main.py refuses to fine-tune with distillation):
  * kd.type='hard', alpha=0.5, tau=1.0 for the star recipes: DeiT's own
    defaults and its best result (hard beat soft in the DeiT paper, Table 3);
    kd.type='none' stays the default of every other preset;
  * the teacher: a fine-tuned TinyMIM-B (85.0% in the paper), the strongest
    model of the same sequential chain, as DeiT used a strong CNN teacher;
  * 1000 epochs, warmup 5, layer decay 0.75, drop path 0.1 (DeiT's and MAE's
    ViT-T settings; TinyMIM*-T's paper gives only the epoch count);
  * `model.dist_pool`: what `head_dist` reads under global pooling (see
    models/classifier.py): 'token' (the dist token through fc_norm).
"""

import ml_collections

from configs import common as cc


def _disable_auto_augment(data: ml_collections.ConfigDict) -> None:
  """RandAugment off, as a str-typed None: a field set to a plain None has
  NoneType, and the command line could not turn it on again
  (`--config.data.auto_augment=rand-m9-mstd0.5-inc1`)."""
  data.get_ref("auto_augment").set(None)


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = cc.stage_config(
    "finetune",
    arg,
    batch_size=1024,
    total_epochs=100,
    warmup_epochs=5,
    base_lr=5e-4,
    min_lr=1e-6,
    optimizer=dict(b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.75),
    data=dict(
      auto_augment="rand-m9-mstd0.5-inc1",
      reprob=0.25,
      remode="pixel",
      recount=1,
      mixup=0.8,
      cutmix=1.0,
      mixup_switch_prob=0.5,
      label_smoothing=0.1,
    ),
  )
  c.mode = "finetune"  # 'finetune' | 'linprobe'
  c.eval_batch_size = 1024
  c.num_classes = 0  # 0: from the dataset
  c.ema_decay = 0.0  # > 0: EMA of weights, evaluated alongside
  c.init = ml_collections.ConfigDict(dict(source=""))
  c.model = cc.model_section(
    "base",
    drop_path=0.1,
    global_pool=True,
    fused_attention=False,  # jax.nn.dot_product_attention (cuDNN on GPU)
    remat=False,  # recompute each block in the backward pass
    scan_blocks=False,  # lax.scan over blocks: faster compile
    dist_token=False,  # DeiT's distillation token and head_dist
    dist_pool="token",  # under global pooling, head_dist reads: 'token' | 'avg'
    extra_width=0,  # > 0: TinyMIM*-T's extra layer to this width (1280)
  )
  # Knowledge distillation (see the docstring). teacher: the architecture of
  # the frozen classifier in `source` (its class count must be the model's).
  c.kd = ml_collections.ConfigDict(
    dict(
      type="none",  # 'none' | 'soft' | 'hard'
      alpha=0.5,
      tau=1.0,
      teacher=cc.model_section(
        "base",
        source="",
        global_pool=True,
        dist_token=False,
        dist_pool="token",
        extra_width=0,
        fused_attention=False,
        scan_blocks=False,
      ),
    )
  )
  c.eval_every = 2000
  c.figures = True  # learning_curves.png and confusion_matrix.png at the end
  return c


def _official(name):
  def edit(c):
    c.model.variant = name
    if name == "base":
      c.optimizer.layer_decay = 0.65
    else:
      c.total_epochs = 200.0

  return edit


def _scratch(c):
  c.model.variant = "base"
  c.total_epochs = 300.0
  c.warmup_epochs = 20.0
  c.optimizer.layer_decay = 1.0


def _quickstart(c):
  cc.custom(c.model, 48, 4, 3, 4, 32)
  c.model.drop_path = 0.1
  c.init.source = "workdirs/quickstart/distill"
  # 32-px shapes: a small crop often misses the shape, so crops stay large
  # and the heavier ImageNet augmentations are off.
  c.data.update(
    name="embedded",
    train_split="train",
    eval_split="test",
    image_size=32,
    num_workers=0,
    reprob=0.0,
    mixup=0.0,
    cutmix=0.0,
    finetune_crop_scale=(0.6, 1.0),
  )
  _disable_auto_augment(c.data)
  c.batch_size = 128
  c.eval_batch_size = 200
  c.total_epochs = 20.0  # 8 epochs reach ~20% top-1 here, 20 epochs ~44%
  c.warmup_epochs = 1.0
  c.base_lr = 4e-3
  c.log_every = 10
  c.eval_every = 156  # every 4 epochs: the accuracy curve has 5 points
  c.checkpoint_every = 100


def _cifar10(c):
  cc.custom(c.model, 96, 12, 3, 4, 32)
  c.model.drop_path = 0.1
  c.data.update(
    name="folder:../shared/data/cifar10",
    train_split="train",
    eval_split="test",
    image_size=32,
    num_workers=2,
  )
  c.batch_size = 256
  c.eval_batch_size = 500
  c.total_epochs = 100.0
  c.log_every = 20
  c.eval_every = 1000
  c.checkpoint_every = 500


def _linprobe(c):
  c.mode = "linprobe"
  c.base_lr = 0.1
  c.min_lr = 0.0
  c.total_epochs = 90.0
  c.warmup_epochs = 10.0
  c.data.label_smoothing = 0.0
  c.optimizer.weight_decay = 0.0
  c.model.drop_path = 0.0
  c.model.global_pool = False  # MAE linprobe uses the CLS token
  c.data.update(reprob=0.0, mixup=0.0, cutmix=0.0)
  _disable_auto_augment(c.data)


def _star(c):
  """TinyMIM*-T's architecture on the preset's model."""
  c.model.num_heads = 12
  c.model.dist_token = True
  c.model.extra_width = 1280


def _tiny_star(c):
  c.model.variant = "tiny"
  _star(c)
  c.total_epochs = 1000.0
  c.kd.update(type="hard", alpha=0.5, tau=1.0)
  c.kd.teacher.variant = "base"
  c.kd.teacher.source = "workdirs/imagenet/finetune"  # configs/pipeline.py:imagenet's stage 3


def _quickstart_star(c):
  _quickstart(c)
  _star(c)
  c.model.extra_width = 256  # 1280 / 192 of the width, about
  c.init.source = "workdirs/quickstart_star/distill"
  c.kd.update(type="hard", alpha=0.5, tau=1.0)
  cc.custom(c.kd.teacher, 48, 4, 3, 4, 32)  # the quickstart's fine-tuned student
  c.kd.teacher.source = "workdirs/quickstart/finetune"


def _kd(c, kind: str):
  c.kd.type = kind


def _cae_layout(c):
  """A configs/cae.py encoder: BEiT-style layer scale and q/v biases (the
  official cae_*_patch16_224 fine-tuning models)."""
  c.model.layer_scale = 0.1
  c.model.qkv_bias = "qv"


# CAE v2 fine-tuning per size (Atten4Vis/CAE scripts): lr (absolute),
# layer decay, epochs, warmup, drop path, RandAugment, mixup, cutmix, smoothing.
CAE_RECIPES = {
  "tiny": (4e-3, 0.85, 100, 5, 0.0, "rand-m10-mstd0.5-inc1", 0.2, 0.0, 0.0),
  "small": (4e-4, 0.75, 200, 20, 0.1, "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1),
  "base": (2e-4, 0.75, 100, 5, 0.1, "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1),
}


def _cae(size: str):
  def edit(c):
    lr, decay, epochs, warmup, drop, aa, mixup, cutmix, smoothing = CAE_RECIPES[size]
    c.model.variant = size
    c.model.num_heads = 12
    c.model.drop_path = drop
    _cae_layout(c)
    c.lr = lr
    c.optimizer.layer_decay = decay
    c.total_epochs, c.warmup_epochs = float(epochs), float(warmup)
    c.data.update(auto_augment=aa, mixup=mixup, cutmix=cutmix, label_smoothing=smoothing)

  return edit


def _cnn(family: str, **model):
  """SparK's CNN fine-tuning recipe (keyu-tian/SparK downstream_imagenet, its
  `arg.py` table): the model section becomes a CNN section, LAMB + BCE for
  ResNets (AdamW + CE for ConvNeXts, set by the preset), SparK's layer-decay
  rule (`optimizer.layer_decay` is its lr_scale), mixup 0.1 / cutmix 1.0
  with label smoothing 0.1, EMA, drop path, eval crop 0.95."""

  def edit(c):
    # global_pool: the fine-tune stage records it; a CNN pools globally.
    c.model = cc.cnn_section(family, drop_path=0.05, global_pool=True, **model)
    c.loss = "bce"  # 'bce' (timm BinaryCrossEntropy) | 'ce' (soft-target cross-entropy)
    c.optimizer.update(
      name="lamb",  # 'lamb' | 'adamw'
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      weight_decay=0.02,
      bias_correction=False,  # timm Lamb(bias_correction=False, always_adapt=True)
      always_adapt=True,
      layer_decay=0.7,
      layer_decay_rule="extended",  # SparK's rule; mimdistill's own for ResNet-18/34
    )
    c.batch_size = 2048
    c.total_epochs = 300.0
    c.warmup_epochs = 5.0
    c.base_lr = 0.002
    c.ema_decay = 0.9999
    c.data.update(mixup=0.1, cutmix=1.0, crop_pct=0.95)

  return edit


def _convnext_recipe(c):
  """SparK's ConvNeXt-S recipe: AdamW + CE, batch 4096, 400 epochs, 20
  warmup, blr 2e-4, wd 0.01, mixup 0.8 (its repeated augmentation x3 is not
  reproduced); ConvNeXt-T keeps the official drop path 0.1."""
  c.loss = "ce"
  c.optimizer.update(name="adamw", eps=1e-8, weight_decay=0.01, bias_correction=True)
  c.batch_size = 4096
  c.total_epochs = 400.0
  c.warmup_epochs = 20.0
  c.base_lr = 2e-4
  c.model.drop_path = 0.1
  c.data.mixup = 0.8


def _cnn_quickstart(c):
  """The heterogeneous quickstart's narrow ResNet-18 at 64 px, with a recipe
  for its 6 epochs (our choice): SparK's LAMB + BCE, made for 300 epochs at
  batch 2048, learns only the class prior here (train loss at the smoothed
  targets' floor, 0.325; 14.7% top-1 after 8 epochs from scratch), so AdamW
  + soft-target CE at lr 1e-3 without layer decay (18.1% after 2 epochs
  where LAMB + BCE gave 11.4%, and 14.3% with layer decay 0.7), the same for
  every initialisation compared."""
  _cnn("resnet", depth=18, div=4, image_size=64)(c)
  c.loss = "ce"
  c.optimizer.update(name="adamw", layer_decay=1.0)
  c.init.source = "workdirs/hetero_quickstart/hetero"
  c.data.update(
    name="embedded",
    train_split="train",
    eval_split="test",
    image_size=64,
    num_workers=0,
    reprob=0.0,
    mixup=0.0,
    cutmix=0.0,
    crop_pct=0.875,
    finetune_crop_scale=(0.6, 1.0),
  )
  _disable_auto_augment(c.data)
  c.batch_size = 64
  c.eval_batch_size = 200
  c.total_epochs = 6.0
  c.warmup_epochs = 1.0
  c.base_lr = 4e-3  # lr 1e-3 at batch 64
  c.ema_decay = 0.99
  c.log_every = 10
  c.eval_every = 156
  c.checkpoint_every = 200


def _cnn_resnet(depth: int, base_lr: float, layer_decay: float, drop_path: float):
  def edit(c):
    _cnn("resnet", depth=depth)(c)
    c.base_lr, c.optimizer.layer_decay, c.model.drop_path = base_lr, layer_decay, drop_path

  return edit


def _cnn_convnext(variant: str):
  def edit(c):
    _cnn("convnext", variant=variant)(c)
    _convnext_recipe(c)
    if variant == "small":
      c.model.drop_path = 0.3

  return edit


PRESETS = {
  "quickstart": _quickstart,
  "cifar10": _cifar10,
  **{v: _official(v) for v in ("tiny", "small", "base")},
  "scratch": _scratch,
  "tiny_star": _tiny_star,
  "quickstart_star": _quickstart_star,
  **{f"cae_{v}": _cae(v) for v in ("tiny", "small", "base")},
  "cnn_quickstart": _cnn_quickstart,
  "cnn_resnet50": _cnn_resnet(50, 0.002, 0.7, 0.05),
  "cnn_resnet101": _cnn_resnet(101, 0.001, 0.8, 0.2),
  "cnn_convnext_tiny": _cnn_convnext("tiny"),
  "cnn_convnext_small": _cnn_convnext("small"),
}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(
    arg,
    name="finetune",
    common=base_config,
    presets=PRESETS,
    default="quickstart",
    modifiers={"linprobe": _linprobe, "star": _star, "cae": _cae_layout},
    prefixed={"kd_": _kd},
  )
