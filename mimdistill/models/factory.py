"""One function builds every model of the project from its config section.

    build("mae", config.model, dtype=config.dtype)
    build("encoder", config.teacher, dtype=config.dtype, depth=block, final_norm=False)
    build("classifier", config.model, num_classes=10, dtype=config.dtype)
    build("tinymim_student", config.student, dtype=config.dtype, proj_width=768)
    build("segmentor", config.model, num_classes=150, dtype=config.dtype)
    build("cae_v2", config.model, dtype=config.dtype, out_dim=512)
    build("clip_visual", clip_spec.module_kwargs(), dtype=config.dtype)
    build("cnn_classifier", config.model, num_classes=10, dtype=config.dtype)
    build("spark", config.model, dtype=config.dtype)
    build("hetero_student", config.model, teacher_width=768, teacher_patch=16, pixel_loss=True)

A section is any mapping (an `ml_collections.ConfigDict`, a dict): the
variant fields that `variants.resolve` reads, plus the options a family
knows. Only the options a section sets are passed on, so a default lives in
one place: the config file, or else the module's own field.

Encoder options (every family built on the ViT): `drop_path` with
`drop_path_schedule` ('linear' ramp by default, see `vit.drop_path_rates`),
`fused_attention`, `remat`, `scan_blocks`, `dist_token`, `layer_scale`,
`qkv_bias`, `rel_pos_bias`, `pos_embed_type`, `final_norm`.

CNN sections (`configs/common.py:cnn_section`; kinds `cnn`, `cnn_classifier`,
`spark`, `hetero_student`): `family` ('resnet' / 'convnext'), `depth` (timm
ResNet 18/34/50/101/152) or `variant` (ConvNeXt tiny/small/...), `div`
(every width divided by it), `block`/`layers`, `depths`/`dims`, `drop_path`,
and for the SparK models `decoder_width` and `densify_norm` ('auto': 'bn' for
a ResNet, 'ln' for a ConvNeXt, as SparK picks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimdistill.models import cnn_zoo, variants
from mimdistill.models.cae import CAEv2
from mimdistill.models.classifier import ViTClassifier
from mimdistill.models.clip import ClipVisual
from mimdistill.models.fcn_head import FCNHead
from mimdistill.models.hetero import HeteroStudent, decoder_blocks_for
from mimdistill.models.mae import MAE
from mimdistill.models.segmentation_backbone import SegmentationBackbone, check_backbone
from mimdistill.models.segmentor import EncoderDecoder
from mimdistill.models.spark import DENSIFY_NORMS, SparK
from mimdistill.models.tinymim import DistillHeads, DistillStudent
from mimdistill.models.uper_head import UPerHead
from mimdistill.models.vit import ViTEncoder, drop_path_rates

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ENCODER_OPTIONS = (
  "fused_attention",
  "remat",
  "scan_blocks",
  "dist_token",
  "layer_scale",
  "qkv_bias",
  "rel_pos_bias",
  "pos_embed_type",
  "final_norm",
)


def compute_dtype(name: str):
  """The jnp dtype of a config's `dtype` name."""
  if name not in DTYPES:
    raise ValueError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def _set(section: Mapping[str, Any], key: str) -> bool:
  return key in section and section[key] is not None


def encoder(section: Mapping[str, Any], *, dtype: str = "float32", **overrides) -> ViTEncoder:
  """A `ViTEncoder` from a section; `overrides` (e.g. `depth` of a truncated
  teacher, `final_norm`) win over the section's fields."""
  spec = variants.resolve(section)
  kwargs: dict[str, Any] = spec.kwargs()
  kwargs.update({k: section[k] for k in ENCODER_OPTIONS if _set(section, k)})
  if _set(section, "drop_path"):
    schedule = section["drop_path_schedule"] if _set(section, "drop_path_schedule") else "linear"
    depth = overrides.get("depth", spec.depth)
    kwargs["drop_path"] = drop_path_rates(float(section["drop_path"]), depth, schedule)
  kwargs.update(overrides)
  return ViTEncoder(dtype=compute_dtype(dtype), **kwargs)


def mae(section: Mapping[str, Any], *, dtype: str = "float32") -> MAE:
  """MAE: the section's encoder plus its `decoder` (width, depth, num_heads)."""
  dec = section["decoder"]
  return MAE(
    encoder=encoder(section, dtype=dtype),
    decoder_width=int(dec["width"]),
    decoder_depth=int(dec["depth"]),
    decoder_heads=int(dec["num_heads"]),
    dtype=compute_dtype(dtype),
  )


def classifier(
  section: Mapping[str, Any],
  *,
  num_classes: int,
  dtype: str = "float32",
  linear_probe: bool = False,
  head_init_std: float = 2e-5,
) -> ViTClassifier:
  """MAE `models_vit`: a learned position embedding, global pooling (no
  encoder norm) unless `global_pool` is False. `dist_token` adds DeiT's
  `head_dist` (what it reads under global pooling: `dist_pool`);
  `extra_width` > 0 adds TinyMIM*-T's extra layer (see `ViTClassifier`)."""
  global_pool = bool(section["global_pool"]) if _set(section, "global_pool") else True
  overrides = {"final_norm": not global_pool}
  if not _set(section, "pos_embed_type"):
    overrides["pos_embed_type"] = "learned"
  options = {k: section[k] for k in ("dist_pool", "extra_width") if _set(section, k)}
  return ViTClassifier(
    encoder=encoder(section, dtype=dtype, **overrides),
    num_classes=int(num_classes),
    global_pool=global_pool,
    linear_probe=linear_probe,
    head_init_std=head_init_std,
    dtype=compute_dtype(dtype),
    **options,
  )


def tinymim_student(
  section: Mapping[str, Any],
  *,
  dtype: str = "float32",
  proj_width: int = 0,
  decoder: Mapping[str, Any] | None = None,
) -> DistillStudent:
  """The TinyMIM student: the section's encoder plus, for the ablation
  targets, a projection to `proj_width` and/or an MAE `decoder`."""
  enc = encoder(section, dtype=dtype)
  heads = None
  if proj_width or decoder:
    heads = DistillHeads(
      proj_width=int(proj_width),
      decoder_spec=(int(decoder["width"]), int(decoder["depth"]), int(decoder["num_heads"]))
      if decoder
      else None,
      num_patches=enc.num_patches,
      out_dim=enc.patch_size**2 * enc.in_chans,
      dtype=compute_dtype(dtype),
    )
  return DistillStudent(encoder=enc, heads=heads)


SEGMENTOR_BACKBONE_OPTIONS = ("out_indices", "neck", "fc_dim")
_HEAD_FIELDS = {
  "decode_head": ("num_classes", "channels", "pool_scales", "in_index", "dropout_ratio"),
  "auxiliary_head": (
    "num_classes",
    "channels",
    "in_index",
    "num_convs",
    "kernel_size",
    "dilation",
    "concat_input",
    "dropout_ratio",
  ),
}


def _head_fields(section: Mapping[str, Any], name: str, num_classes: int | None) -> dict:
  head = dict(section[name])
  unknown = set(head) - set(_HEAD_FIELDS[name])
  if unknown:
    raise ValueError(
      f"model.{name} has unknown fields {sorted(unknown)}; known: {list(_HEAD_FIELDS[name])}"
    )
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in head.items() if v is not None}
  if num_classes is not None:
    fields["num_classes"] = int(num_classes)
  if "num_classes" not in fields:
    raise ValueError(f"model.{name} needs num_classes (or pass num_classes=)")
  return fields


def check_segmentor_heads(section: Mapping[str, Any]) -> None:
  """The heads' sizes, refused before a segmentation run loads its init
  source: a zero-width head or a pool scale of 0 would fail only when traced,
  a dropout ratio of 1 or more would zero every feature without a word."""
  if _set(section, "fc_dim") and not (
    isinstance(section["fc_dim"], int) and section["fc_dim"] >= 1
  ):
    raise ValueError(f"model.fc_dim={section['fc_dim']!r} must be an integer >= 1")
  for name in _HEAD_FIELDS:
    if name not in section or not section[name]:
      continue
    head = _head_fields(section, name, num_classes=1)
    for key, minimum in (("channels", 1), ("num_convs", 0), ("kernel_size", 1), ("dilation", 1)):
      value = head.get(key)
      if value is not None and not (isinstance(value, int) and value >= minimum):
        raise ValueError(f"model.{name}.{key}={value!r} must be an integer >= {minimum}")
    ratio = head.get("dropout_ratio")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
      raise ValueError(
        f"model.{name}.dropout_ratio={ratio!r} must be in [0, 1) (0: no dropout; mmseg: 0.1)"
      )
    scales = head.get("pool_scales")
    if scales is not None and not (
      len(scales) >= 1 and all(isinstance(v, int) and v >= 1 for v in scales)
    ):
      raise ValueError(
        f"model.{name}.pool_scales={scales!r} must be one or more positive ints (mmseg: 1,2,3,6)"
      )


def segmentor(
  section: Mapping[str, Any], *, num_classes: int | None = None, dtype: str = "float32"
) -> EncoderDecoder:
  """TinyMIM's UperNet (`models.segmentor`): the section's encoder (no
  final norm; the distillation token for `neck='tinymim_star'`; a learned
  position embedding unless `pos_embed_type` says otherwise) with the
  backbone options `out_indices`, `neck`, `fc_dim`, a `decode_head`
  (UPerHead fields) and an optional `auxiliary_head` (FCNHead fields; None
  or empty: none). `num_classes` (e.g. the dataset's) overrides the heads'."""
  spec = variants.resolve(section)
  options = {k: section[k] for k in SEGMENTOR_BACKBONE_OPTIONS if _set(section, k)}
  if "out_indices" in options:
    options["out_indices"] = tuple(int(i) for i in options["out_indices"])
  neck = options.get("neck", "tinymim")
  check_backbone(
    neck=neck,
    patch_size=spec.patch_size,
    image_size=spec.image_size,
    depth=spec.depth,
    out_indices=options.get("out_indices", SegmentationBackbone.out_indices),
  )
  overrides = {"final_norm": False, "dist_token": neck == "tinymim_star"}
  if not _set(section, "pos_embed_type"):
    overrides["pos_embed_type"] = "learned"
  backbone = SegmentationBackbone(
    encoder=encoder(section, dtype=dtype, **overrides), dtype=compute_dtype(dtype), **options
  )
  heads = {}
  for name, cls in (("decode_head", UPerHead), ("auxiliary_head", FCNHead)):
    if name in section and section[name]:
      heads[name] = cls(**_head_fields(section, name, num_classes), dtype=compute_dtype(dtype))
  if "decode_head" not in heads:
    raise ValueError("a segmentor model section needs a decode_head subsection")
  return EncoderDecoder(backbone, heads["decode_head"], heads.get("auxiliary_head"))


def cae_v2(section: Mapping[str, Any], *, out_dim: int, dtype: str = "float32") -> CAEv2:
  """CAE v2 (`models.cae`): the section's encoder with CAE's fixed sin-cos
  layout (`layer_scale` 0 or unset: no gammas) plus its `regressor` (width,
  depth, num_heads, layer_scale); `out_dim` is the teacher's token width.
  The regressor's stochastic depth is its own `linspace(0, drop_path,
  depth)`, as the official `LatentRegresser` builds it."""
  overrides: dict[str, Any] = {"pos_embed_type": "cae_sincos"}
  if not (_set(section, "layer_scale") and float(section["layer_scale"]) > 0):
    overrides["layer_scale"] = None
  reg = section["regressor"]
  return CAEv2(
    encoder=encoder(section, dtype=dtype, **overrides),
    regressor_width=int(reg["width"]),
    regressor_depth=int(reg["depth"]),
    regressor_heads=int(reg["num_heads"]),
    regressor_layer_scale=float(reg["layer_scale"] or 0.0),
    regressor_drop_path=float(section["drop_path"]) if _set(section, "drop_path") else 0.0,
    out_dim=int(out_dim),
    init_std=float(section["init_std"]) if _set(section, "init_std") else 0.02,
    dtype=compute_dtype(dtype),
  )


def cnn(section: Mapping[str, Any], *, dtype: str = "float32", **overrides) -> nn.Module:
  """A ResNet / ConvNeXt (`cnn_zoo.build_cnn`) from a CNN section;
  `overrides` (e.g. `num_classes`) win over the section's fields."""
  fields = cnn_zoo.fields_of_section(section)
  return cnn_zoo.build_cnn(fields, dtype=compute_dtype(dtype), **overrides)


def cnn_classifier(
  section: Mapping[str, Any], *, num_classes: int, dtype: str = "float32"
) -> cnn_zoo.CNNClassifier:
  """The dense CNN returning logits (fine-tuning, evaluation)."""
  return cnn_zoo.CNNClassifier(cnn(section, dtype=dtype, num_classes=int(num_classes)))


# SparK's `densify_norm` by encoder family (`pretrain/utils/arg_util.py`).
DENSIFY_NORM_OF_FAMILY = {"resnet": "bn", "convnext": "ln"}


def spark(
  section: Mapping[str, Any], *, dtype: str = "float32", decoder_blocks: int | None = None
) -> SparK:
  """SparK: the section's CNN (no classifier), densify and LightDecoder."""
  norm = section["densify_norm"] if _set(section, "densify_norm") else "auto"
  if norm == "auto":
    norm = DENSIFY_NORM_OF_FAMILY[cnn_zoo.family_of(cnn_zoo.fields_of_section(section))]
  if norm not in DENSIFY_NORMS:  # the module checks it only when first run
    raise ValueError(f"model.densify_norm={norm!r} is not one of {('auto', *DENSIFY_NORMS)}")
  return SparK(
    encoder=cnn(section, dtype=dtype, num_classes=0),
    decoder_width=int(section["decoder_width"]) if _set(section, "decoder_width") else 768,
    densify_norm=norm,
    decoder_blocks=decoder_blocks,
    dtype=compute_dtype(dtype),
  )


CLIP_FIELDS = (
  "width",
  "layers",
  "heads",
  "patch_size",
  "image_size",
  "output_dim",
  "mlp_ratio",
  "act",
  "layer_scale",
  "pre_norm",
)


def clip_visual(section: Mapping[str, Any], *, dtype: str = "float32") -> ClipVisual:
  """A CLIP image tower (`models.clip`) from `interop.clip_names.ClipVisualSpec.
  module_kwargs()` or any mapping of its fields."""
  return ClipVisual(
    **{k: section[k] for k in CLIP_FIELDS if k in section}, dtype=compute_dtype(dtype)
  )


def hetero_student(
  section: Mapping[str, Any],
  *,
  teacher_width: int,
  teacher_patch: int,
  pixel_loss: bool,
  dtype: str = "float32",
) -> HeteroStudent:
  """SparK plus the projection to the teacher's tokens (`models/hetero.py`);
  without the pixel loss the decoder stops at the teacher's stride."""
  blocks = None if pixel_loss else decoder_blocks_for(int(teacher_patch))
  return HeteroStudent(
    spark(section, dtype=dtype, decoder_blocks=blocks),
    teacher_width=int(teacher_width),
    teacher_patch=int(teacher_patch),
  )


BUILDERS: dict[str, Callable[..., nn.Module]] = {
  "encoder": encoder,
  "mae": mae,
  "classifier": classifier,
  "tinymim_student": tinymim_student,
  "segmentor": segmentor,
  "cae_v2": cae_v2,
  "clip_visual": clip_visual,
  "cnn": cnn,
  "cnn_classifier": cnn_classifier,
  "spark": spark,
  "hetero_student": hetero_student,
}


def build(kind: str, section: Mapping[str, Any], **kwargs) -> nn.Module:
  """The model of `kind` from its config section (see the module doc)."""
  if kind not in BUILDERS:
    raise ValueError(f"unknown model kind {kind!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[kind](section, **kwargs)
