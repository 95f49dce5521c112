r"""python launch/train.py --config configs/tinymim_distill.py:quickstart --workdir workdirs/quickstart/distill

Stage 2, TinyMIM distillation: a frozen MIM teacher's token relations (Q-K,
V-V at a teacher block) distilled into a small ViT's last block. The teacher
source (`teacher.source`) is a stage-1/stage-2 workdir (`W` or `W:step`,
only its encoder params are restored) or an official `.pth` (MAE pre-trained
encoder with or without decoder, a TinyMIM student).

Presets (`:<arg>`):
  quickstart  distils the stage-1 quickstart teacher (configs/mae_pretrain.py:
              quickstart; default source workdirs/quickstart/pretrain, the
              README's stage-1 workdir) into a 48-wide student on the embedded
              dataset; about 3 minutes on 2 CPU cores
  cifar10     ViT-T-sized teacher from mae_pretrain.py:cifar10 -> 96-wide
              student on class folders (set data.name=folder:<root>)
  b_from_l    MAE-L -> TinyMIM-B, R=16, teacher block 18 of 24 (the official
              recipe: 300 epochs, 15 warmup, batch 4096, lr 1.5e-4*bs/256,
              AdamW (0.9, 0.95), wd 0.05); the default
  s_from_b    TinyMIM-B -> TinyMIM-S, R=12
  t_from_s    TinyMIM-S -> TinyMIM-T, R=12, student with 6 heads
  tstar_from_s  TinyMIM-S -> TinyMIM*-T: ViT-T with 12 heads (head dim 16)
              and DeiT's distillation token, R=12 (then fine-tuned with KD:
              configs/finetune.py:tiny_star)
Sequential distillation (each link's teacher is the previous link's workdir):
  python launch/train.py --config configs/tinymim_distill.py:b_from_l --workdir W/b \
      --config.teacher.source=mae_pretrain_vit_large.pth
  python launch/train.py --config configs/tinymim_distill.py:s_from_b --workdir W/s \
      --config.teacher.source=W/b
  python launch/train.py --config configs/tinymim_distill.py:t_from_s --workdir W/t \
      --config.teacher.source=W/s

Ablation targets (paper Tables 5-7, 10, 12) are modifiers appended with commas
to a preset (alone they modify b_from_l), e.g. `:cifar10,feature_attn`:
  qq_kk_vv            relation set {Q-Q, K-K, V-V} instead of {Q-K, V-V}
  no_softmax          relations without softmax: MSE on the raw scaled logits
                      (distill.raw_loss='smooth_l1' for smooth-L1, beta 2.0)
  cls                 class-token distillation (KL of softmaxed CLS features)
  feature, feature_<type>  feature distillation, type in output, attn,
                      attn_residual, ffn, ffn_residual, q, k, v
  block<k>            teacher target block k (1-based); the cls and feature
                      targets also read the teacher at its target block
  masked              MAE-masked student input (teacher sees the whole image)
  masked_mae          masked input plus the MAE reconstruction loss (decoder
                      head in params['heads']['decoder'])
  star                the TinyMIM*-T student on the preset's: 12 heads and the
                      distillation token (`distill.dist_token`: 'exclude', our
                      choice, drops it from the relations; 'as_cls' gives it
                      the teacher's CLS relations as targets)
Override anything: --config.total_epochs=5 --config.distill.relation_heads=8 ...
"""

import ml_collections

from configs import common as cc

FEATURES = ("output", "attn", "attn_residual", "ffn", "ffn_residual", "q", "k", "v")


def base_config(arg: str) -> ml_collections.ConfigDict:
  c = cc.stage_config(
    "distill",
    arg,
    batch_size=4096,
    total_epochs=300,
    warmup_epochs=15,
    base_lr=1.5e-4,
    min_lr=0.0,
    optimizer=dict(b1=0.9, b2=0.95, weight_decay=0.05),
    data=dict(crop_scale=(0.2, 1.0), color_jitter=0.4),
  )
  # The trained student. drop path: constant on every block but the last.
  # Speed options (numerics of the official code with all False):
  # jax.nn.dot_product_attention (cuDNN on GPU) in the blocks before the
  # last (whose relations use its qkv explicitly); remat recomputes each
  # block in the backward pass; scan_blocks runs the blocks before the last
  # under one lax.scan (compile time; same params, other but equally
  # distributed drop-path masks).
  c.student = cc.model_section(
    "base",
    drop_path=0.1,
    drop_path_schedule="constant_but_last",
    fused_attention=False,
    remat=False,
    scan_blocks=False,
    dist_token=False,  # DeiT's distillation token (TinyMIM*-T), see distill.dist_token
  )
  # The frozen teacher: architecture, where its weights come from, and the
  # target block (1-based; 0 = 18 for a depth-24 teacher, else its last).
  c.teacher = cc.model_section(
    "large",
    source="",
    block=0,
    fused_attention=False,  # in the blocks before the target block
    scan_blocks=False,  # lax.scan over those blocks (compile time)
  )
  c.distill = ml_collections.ConfigDict(
    dict(
      target="relation",  # 'relation' | 'cls' | 'feature'
      relation_heads=0,  # R; 0 = the teacher's heads
      relation_set="qk_vv",  # 'qk_vv' | 'qq_kk_vv'
      softmax=True,  # False: regress the raw relation logits
      raw_loss="mse",  # without softmax: 'mse' | 'smooth_l1'
      feature="output",  # feature type of target 'feature'
      beta=2.0,  # smooth-L1 beta
      student_input="raw",  # 'raw' | 'masked'
      mask_ratio=0.75,
      mae_weight=0.0,  # > 0 (masked input): + weight * MAE loss
      norm_pix_loss=True,
      decoder=dict(width=512, depth=8, num_heads=16),
      # A student dist token in the targets: 'exclude' (dropped from the
      # student's relations / features) | 'as_cls' (target = teacher's CLS).
      dist_token="exclude",
    )
  )
  c.num_visualize = 3  # query rows of relation_maps.png (0: none)
  return c


def _pair(teacher: str, student: str, relation_heads: int, student_heads=None):
  def edit(c):
    c.teacher.variant, c.student.variant = teacher, student
    c.distill.relation_heads = relation_heads
    if student_heads:
      c.student.num_heads = student_heads

  return edit


def _quickstart(c):
  # Teacher = configs/mae_pretrain.py:quickstart's encoder.
  cc.custom(c.teacher, 64, 4, 4, 4, 32)
  c.teacher.source = "workdirs/quickstart/pretrain"  # README command 1
  cc.custom(c.student, 48, 4, 3, 4, 32)  # R = 4 teacher heads != 3 own heads
  c.distill.decoder.update(width=64, depth=2, num_heads=4)
  c.data.update(
    name="embedded", train_split="train", eval_split="test", image_size=32, num_workers=0
  )
  c.batch_size = 128
  c.total_epochs = 7.0
  c.warmup_epochs = 1.0
  c.base_lr = 1.5e-4 * 8  # small models on little data like a higher lr
  c.log_every = 10
  c.checkpoint_every = 100


def _cifar10(c):
  # Teacher = configs/mae_pretrain.py:cifar10's encoder.
  cc.custom(c.teacher, 192, 12, 3, 4, 32)
  cc.custom(c.student, 96, 12, 3, 4, 32)
  c.distill.decoder.update(width=128, depth=2, num_heads=4)
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
  "b_from_l": _pair("large", "base", 16),
  "s_from_b": _pair("base", "small", 12),
  # Distilled with 6 heads (fine-tuned later with 3 on the same weights);
  # R=12 relation heads on a 6-head teacher/student works here.
  "t_from_s": _pair("small", "tiny", 12, student_heads=6),
  "tstar_from_s": lambda c: (_pair("small", "tiny", 12)(c), _star(c)),
}


def _star(c):
  """TinyMIM*-T's student: 12 heads (head dim 16 at ViT-T's width 192) and
  the distillation token; the extra layer after the last block belongs to
  fine-tuning (configs/finetune.py `star`), distillation never reaches it."""
  c.student.num_heads = 12
  c.student.dist_token = True


def _set_distill(**fields):
  def edit(c):
    c.distill.update(fields)

  return edit


def _feature(c, kind: str):
  if kind not in FEATURES:
    raise ValueError(kind)
  c.distill.update(target="feature", feature=kind)


def _block(c, k: str):
  c.teacher.block = int(k)


MODIFIERS = {
  "qq_kk_vv": _set_distill(relation_set="qq_kk_vv"),
  "no_softmax": _set_distill(softmax=False),
  "cls": _set_distill(target="cls"),
  "feature": _set_distill(target="feature"),
  "masked": _set_distill(student_input="masked"),
  "masked_mae": _set_distill(student_input="masked", mae_weight=1.0),
  "star": _star,
}


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  return cc.parse(
    arg,
    name="tinymim_distill",
    common=base_config,
    presets=PRESETS,
    default="b_from_l",
    modifiers=MODIFIERS,
    prefixed={"feature_": _feature, "block": _block},
  )
