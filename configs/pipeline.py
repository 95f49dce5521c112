r"""python launch/pipeline.py --config configs/pipeline.py:quickstart --workdir workdirs/quickstart

The stages as one resumable job: W/pretrain -> W/distill -> W/finetune,
each stage reading the previous stage's checkpoint; the quickstart adds
W/segment (stage 4, semantic segmentation), a sibling of fine-tuning: it
also starts from the distilled checkpoint (`segment.parent='distill'`). A rerun skips finished
stages and resumes an interrupted one; W/summary.json records per stage the
metrics, time, steps, checkpoint and lineage.

Presets (`:<arg>`):
  quickstart      embedded dataset, tiny models, about 12 minutes on 2 CPU cores
                  (with the segmentation stage on the embedded scenes)
  cifar10         class folders (default ../shared/data/cifar10)
  imagenet        TFDS imagenet2012, official recipes: MAE ViT-L pre-training,
                  TinyMIM-B distillation, ViT-B fine-tuning
  imagenet_chain  skips stage 1 and runs the sequential chain from an official
                  MAE ViT-L teacher (set teacher_source=<mae_pretrain_vit_large.pth>):
                  TinyMIM-B (R=16) -> TinyMIM-S (R=12) -> TinyMIM-T (R=12, 6 heads)
                  -> fine-tune ViT-T with 3 heads
  imagenet_star   TinyMIM*-T: the same chain into the 12-head, distillation-token
                  ViT-T (MAE-L -> B -> S -> T*), then 1000 epochs of hard KD
                  fine-tuning from a fine-tuned TinyMIM-B
                  (finetune.kd.teacher.source, default workdirs/imagenet/finetune:
                  run the imagenet preset there first, or point at any classifier)
  quickstart_star the same at quickstart size on the embedded dataset: the
                  quickstart's stage-1 teacher -> TinyMIM*-T-style student,
                  then KD fine-tuning from the quickstart's fine-tuned student
                  (run the quickstart preset in workdirs/quickstart first);
                  --config.finetune.kd.type=none is the same run without KD
Baselines (paper Table 1), same data and student as the preset after the colon:
  mae_baseline:<preset>      MAE pre-training of the student itself, then fine-tuning
                             (and segmentation, from the same MAE encoder); of a
                             chain, its last student (not the TinyMIM*-T presets:
                             MAE has no distillation token)
  scratch_baseline:<preset>  fine-tuning (and segmentation) from random init
CAE v2 in place of TinyMIM distillation (configs/cae.py), then fine-tuning:
  cae:quickstart, cae:cifar10  the stage-1 teacher -> CAE v2 (the preset of the
                               same name) -> fine-tuning with the CAE layout
  cae:imagenet                 CLIP ViT-B/16 (ViT-B-16.pt) -> CAE v2-B -> finetune.py:cae_base
Heterogeneous CNN students (W/pretrain -> W/hetero -> W/finetune: a MIM ViT
teacher distilled into a sparse CNN, configs/hetero_distill.py, then the CNN
fine-tuned, configs/finetune.py:cnn_*):
  hetero_quickstart  embedded dataset at 64 px: the stage-1 ViT (64 wide,
                  patch 8) -> a ResNet-18 with every width / 4 -> fine-tuning
  hetero_imagenet_resnet50        official MAE ViT-L (block 18) -> ResNet-50
  hetero_imagenet_resnet50_vitb   official MAE ViT-B -> ResNet-50
  hetero_imagenet_convnext_tiny   official MAE ViT-B -> ConvNeXt-T
  (the ImageNet ones skip stage 1: teacher_source=mae_pretrain_vit_{large,base}.pth)
  spark_baseline:<hetero preset>   SparK pixel pre-training of the same CNN
                  (W/spark, configs/spark_pretrain.py) instead, then fine-tuning
  scratch_baseline:<hetero preset> the same CNN fine-tuned from random init
`teacher_source=<.pth or workdir>` skips stage 1 and distils from it.
Stage fields are overridden as --config.<stage>.<field>=..., e.g.
--config.distill.total_epochs=3.
"""

import ml_collections

from configs import (
  cae,
  finetune,
  hetero_distill,
  mae_pretrain,
  segment,
  spark_pretrain,
  tinymim_distill,
)

# preset -> the (stage-1, stage-2, stage-3) config presets it chains.
_THREE_STAGES = {
  "quickstart": ("quickstart", "quickstart", "quickstart"),
  "cifar10": ("cifar10", "cifar10", "cifar10"),
  "imagenet": ("large", "b_from_l", "base"),
}
_ORDER = (
  "pretrain",
  "spark",
  "hetero",
  "distill",
  "distill_s",
  "distill_t",
  "cae",
  "finetune",
  "segment",
)
# Heterogeneous presets: (stage-1 MAE preset, hetero_distill preset,
# fine-tune preset, spark_pretrain preset of the baseline, official teacher).
_HETERO = {
  "hetero_quickstart": ("quickstart", "quickstart", "cnn_quickstart", "quickstart", ""),
  "hetero_imagenet_resnet50": (
    "large",
    "resnet50_from_large",
    "cnn_resnet50",
    "resnet50",
    "mae_pretrain_vit_large.pth",
  ),
  "hetero_imagenet_resnet50_vitb": (
    "base",
    "resnet50_from_base",
    "cnn_resnet50",
    "resnet50",
    "mae_pretrain_vit_base.pth",
  ),
  "hetero_imagenet_convnext_tiny": (
    "base",
    "convnext_tiny_from_base",
    "cnn_convnext_tiny",
    "convnext_tiny",
    "mae_pretrain_vit_base.pth",
  ),
}


def _student_as_mae(pre, student):
  """Stage-1 config that pre-trains the student architecture itself."""
  for key in ("variant", "width", "depth", "num_heads", "patch_size", "image_size"):
    pre.model[key] = student[key]


def _hetero(c, preset: str, baseline: str) -> None:
  """The stages of a heterogeneous preset (and of its SparK baseline)."""
  pre, het, fin, spark, teacher = _HETERO[preset]
  c.pretrain = mae_pretrain.get_config(pre)
  if preset == "hetero_quickstart":
    # The teacher sees the student's 64-px crop: patch 8 keeps the 8x8 token
    # grid of the 32-px quickstart teacher and lines up with the 2x2 mask grid.
    c.pretrain.model.update(patch_size=8, image_size=64)
    c.pretrain.data.image_size = 64
    c.pretrain.total_epochs = 6.0  # the whole pipeline: 12.4 min measured on 2 shared cores
  c.hetero = hetero_distill.get_config(het)
  c.finetune = finetune.get_config(fin)
  c.teacher_source = teacher
  if baseline == "spark_baseline":
    c.spark = spark_pretrain.get_config(spark)


def get_config(arg: str = "quickstart") -> ml_collections.ConfigDict:
  baseline, _, preset = arg.partition(":") if ":" in arg else ("", "", arg)
  c = ml_collections.ConfigDict()
  c.preset = arg
  c.teacher_source = ""  # skip stage 1: distil from this .pth or workdir
  # Run this stage and the ones after it again (a finished stage whose config
  # changed is refused otherwise); the finished ones are kept, renamed.
  c.rerun_from = ""
  if preset in _THREE_STAGES:
    pre, dis, fin = _THREE_STAGES[preset]
    c.pretrain = mae_pretrain.get_config(pre)
    c.distill = tinymim_distill.get_config(dis)
    c.finetune = finetune.get_config(fin)
    if preset == "quickstart":
      c.segment = segment.get_config("quickstart")  # parent: distill
  elif preset == "imagenet_star":
    c.pretrain = mae_pretrain.get_config("large")
    c.distill = tinymim_distill.get_config("b_from_l")
    c.distill_s = tinymim_distill.get_config("s_from_b")
    c.distill_t = tinymim_distill.get_config("tstar_from_s")
    c.finetune = finetune.get_config("tiny_star")
    c.teacher_source = "mae_pretrain_vit_large.pth"
  elif preset == "quickstart_star":
    c.distill = tinymim_distill.get_config("quickstart,star")
    c.finetune = finetune.get_config("quickstart_star")
    c.teacher_source = "workdirs/quickstart/pretrain"  # the quickstart's stage 1
  elif preset in _HETERO:
    if baseline == "mae_baseline":
      raise ValueError(f"{preset} is heterogeneous: use spark_baseline or scratch_baseline")
    _hetero(c, preset, baseline)
  elif preset == "imagenet_chain":
    c.pretrain = mae_pretrain.get_config("large")
    c.distill = tinymim_distill.get_config("b_from_l")
    c.distill_s = tinymim_distill.get_config("s_from_b")
    c.distill_t = tinymim_distill.get_config("t_from_s")
    c.finetune = finetune.get_config("tiny")  # 3 heads on the 6-head weights
    c.teacher_source = "mae_pretrain_vit_large.pth"
  else:
    raise ValueError(
      f"unknown pipeline preset {preset!r}; use "
      f"{', '.join([*_THREE_STAGES, 'imagenet_chain', 'imagenet_star', 'quickstart_star', *_HETERO])} "
      "(optionally mae_baseline:<preset>, scratch_baseline:<preset> or cae:<preset>; "
      "spark_baseline:<hetero preset>)"
    )
  order = [k for k in _ORDER if k in c]
  if baseline == "mae_baseline":
    if preset in ("imagenet_star", "quickstart_star"):
      raise ValueError(
        f"mae_baseline:{preset}: MAE pre-training has no distillation token, so the "
        "TinyMIM*-T student has no MAE baseline; use mae_baseline:imagenet_chain (the same "
        f"ViT-T without it) or scratch_baseline:{preset}"
      )
    # The student of the chain's last distillation, pre-trained by MAE
    # itself: no external teacher, so stage 1 is not skipped.
    last = [k for k in ("distill", "distill_s", "distill_t") if k in c][-1]
    _student_as_mae(c.pretrain, c[last].student)
    c.teacher_source = ""
    order = ["pretrain", "finetune"]
    if "segment" in c:
      c.segment.parent = "pretrain"
      order.append("segment")
  elif baseline == "scratch_baseline":
    order = ["finetune"]
    c.teacher_source = ""  # nothing is distilled
    c.finetune.init.source = ""
    if "segment" in c:
      c.segment.parent = "none"
      c.segment.init.source = ""
      order.append("segment")
  elif baseline == "cae":
    if preset not in _THREE_STAGES:
      raise ValueError(f"cae:{preset}: use cae:quickstart, cae:cifar10 or cae:imagenet")
    c.cae = cae.get_config("base" if preset == "imagenet" else preset)
    c.finetune = finetune.get_config("cae_base" if preset == "imagenet" else f"{fin},cae")
    # CLIP is the teacher on ImageNet: no stage 1.
    order = ["cae", "finetune"] if preset == "imagenet" else ["pretrain", "cae", "finetune"]
  elif baseline == "spark_baseline" and preset in _HETERO:
    order = ["spark", "finetune"]
    c.teacher_source = ""  # SparK learns from pixels, no teacher
  elif baseline:
    raise ValueError(
      f"unknown baseline {baseline!r}; use mae_baseline, scratch_baseline or cae "
      "(spark_baseline for the hetero presets)"
    )
  c.stages = ",".join(order)
  return c
