"""What model a checkpoint holds, read from its tensor names and shapes.

Official MAE / TinyMIM / timm ViT checkpoints carry no config, but their
tensors tell almost everything:

  width        `cls_token` (1, 1, D)
  dist token   `dist_token` (1, 1, D): DeiT's tokens `[cls, dist, patches]`,
               a classifier then has `head_dist` too
  depth        the number of `blocks.<i>` (0..depth-1, none missing)
  patch, chans `patch_embed.proj.weight` (D, C, p, p)
  image size   `pos_embed` (1, prefix + (S/p)^2, D), prefix = 1 or 2 with the
               dist token (else `--image_size`, default 224)
  mlp ratio    `blocks.0.mlp.fc1.weight` (ratio*D, D)
  layer scale  `blocks.<i>.gamma_1` / `gamma_2` (BEiT; timm's `ls1.gamma` /
               `ls2.gamma` are the same tensors under other names)
  decoder      `decoder_embed` (width), `decoder_blocks.<i>` (depth) -> layout 'mae'
  pooling      `fc_norm` -> average pooling (`models_vit` global_pool, encoder
               `norm` deleted); `norm` + `head` -> CLS token pooling
  classes      `head.weight` (num_classes, D)          -> layout 'classifier'
  extra layer  `conv1x1.1.weight` (E, D): TinyMIM*-T's LayerNorm-Linear-GELU
               after the blocks, so `fc_norm` and the heads are E wide

The number of attention heads is NOT in the weights (it only splits the
qkv projection). It is taken from the caller or assumed from the standard
width (ViT-T/S/B/L/H: 192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16, 1280 -> 16;
MAE decoders: 16), and :class:`ModelSpec` records which fields were assumed.
TinyMIM's pre-trained students build their last block with the teacher's
head count; that too is invisible in the weights and irrelevant to them: in
mimdistill the relation heads are a property of the distillation, and the
student is fine-tuned with its own heads on the same weights.

Layouts (names as in `official_names`): 'vit' (an encoder: MAE pre-trained
encoder-only, TinyMIM pre-trained student, timm without head), 'mae'
(encoder + decoder) and 'classifier' (encoder + optional `fc_norm` + `head`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mimdistill.interop.official_names import canonical_name
from mimdistill.models.variants import MAE_DECODER, STANDARD_HEADS

LAYOUTS = ("vit", "mae", "classifier")
POS_EMBED_TYPES = ("fixed", "learned")

DEFAULT_HEADS = STANDARD_HEADS
DEFAULT_DECODER_HEADS = MAE_DECODER[2]  # every released MAE decoder (512 wide)
DEFAULT_IMAGE_SIZE = 224

BLOCK_LEAVES = (
  "norm1.weight",
  "norm1.bias",
  "attn.qkv.weight",
  "attn.qkv.bias",
  "attn.proj.weight",
  "attn.proj.bias",
  "norm2.weight",
  "norm2.bias",
  "mlp.fc1.weight",
  "mlp.fc1.bias",
  "mlp.fc2.weight",
  "mlp.fc2.bias",
)

# Well-known tensors of ViT variants this project does not implement.
_UNSUPPORTED_HINTS = (
  (re.compile(r"(^|\.)ls[12]\.gamma$|(^|\.)gamma_[12]$"), "layer scale outside the blocks"),
  (re.compile(r"^reg_token$"), "register tokens"),
  (re.compile(r"relative_position|rel_pos"), "relative position biases (BEiT style)"),
  (re.compile(r"(^|\.)q_norm\.|(^|\.)k_norm\."), "qk-norm"),
  (re.compile(r"(^|\.)q_bias$|(^|\.)v_bias$"), "split q/v biases (BEiT style)"),
  (re.compile(r"^pre_logits\."), "a pre-logits representation layer (timm in21k)"),
  (re.compile(r"^norm_pre\."), "a pre-norm before the blocks (CLIP style)"),
  (re.compile(r"^attn_pool\."), "attention pooling"),
)


class LayoutError(ValueError):
  """The tensors do not describe a model mimdistill can hold; says why and what to do."""


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  width: int
  depth: int
  num_heads: int
  out_dim: int  # patch_size**2 * in_chans


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A detected model: enough to build the Flax module and to name its tensors."""

  layout: str
  width: int
  depth: int
  num_heads: int | None
  patch_size: int
  image_size: int
  in_chans: int = 3
  mlp_ratio: float = 4.0
  final_norm: bool = True  # encoder `norm` (absent with avg pooling)
  pos_embed: str = "fixed"  # 'fixed' sin-cos buffer or 'learned' param
  pooling: str | None = None  # classifier: 'avg' (fc_norm) or 'cls'
  num_classes: int | None = None
  decoder: DecoderSpec | None = None
  dtype: str = "float32"
  assumed: tuple[str, ...] = ()  # fields not read from the weights
  dist_token: bool = False  # DeiT: tokens [cls, dist, patches], `head_dist`
  layer_scale: bool = False  # `gamma_1` / `gamma_2` in every block
  extra_width: int = 0  # TinyMIM*-T's extra layer `conv1x1` (classifier)

  # -- naming ---------------------------------------------------------------
  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.dist_token else 1

  @property
  def head_width(self) -> int:
    return self.extra_width or self.width

  def expected_names(self) -> list[str]:
    """Official names of every tensor the official module's state dict has."""
    names = ["cls_token", "pos_embed"] + (["dist_token"] if self.dist_token else [])
    names += ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    leaves = (("gamma_1", "gamma_2") if self.layer_scale else ()) + BLOCK_LEAVES
    names += [f"blocks.{i}.{leaf}" for i in range(self.depth) for leaf in leaves]
    if self.final_norm:
      names += ["norm.weight", "norm.bias"]
    if self.decoder is not None:
      names += ["mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
      names += [
        f"decoder_blocks.{i}.{leaf}" for i in range(self.decoder.depth) for leaf in BLOCK_LEAVES
      ]
      names += [
        "decoder_norm.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
        "decoder_pred.bias",
      ]
    if self.layout == "classifier":
      if self.extra_width:
        names += [f"conv1x1.{i}.{leaf}" for i in (0, 1) for leaf in ("weight", "bias")]
      if self.pooling == "avg":
        names += ["fc_norm.weight", "fc_norm.bias"]
      names += ["head.weight", "head.bias"]
      if self.dist_token:
        names += ["head_dist.weight", "head_dist.bias"]
    return names

  def expected_shapes(self) -> dict[str, tuple[int, ...]]:
    d, p, c = self.width, self.patch_size, self.in_chans
    hidden = int(d * self.mlp_ratio)
    n = 1 + self.grid**2
    shapes = {
      "cls_token": (1, 1, d),
      "dist_token": (1, 1, d),
      "pos_embed": (1, self.num_prefix_tokens + self.grid**2, d),
      "patch_embed.proj.weight": (d, c, p, p),
      "patch_embed.proj.bias": (d,),
      "norm.weight": (d,),
      "norm.bias": (d,),
    }
    shapes.update(_block_shapes("blocks", self.depth, d, hidden))
    shapes.update({f"blocks.{i}.gamma_{j}": (d,) for i in range(self.depth) for j in (1, 2)})
    if self.decoder is not None:
      dd = self.decoder.width
      shapes.update(
        {
          "mask_token": (1, 1, dd),
          "decoder_pos_embed": (1, n, dd),
          "decoder_embed.weight": (dd, d),
          "decoder_embed.bias": (dd,),
          "decoder_norm.weight": (dd,),
          "decoder_norm.bias": (dd,),
          "decoder_pred.weight": (self.decoder.out_dim, dd),
          "decoder_pred.bias": (self.decoder.out_dim,),
        }
      )
      shapes.update(
        _block_shapes("decoder_blocks", self.decoder.depth, dd, int(dd * self.mlp_ratio))
      )
    if self.layout == "classifier":
      h, e = self.head_width, self.extra_width
      shapes.update(
        {
          "conv1x1.0.weight": (d,),
          "conv1x1.0.bias": (d,),
          "conv1x1.1.weight": (e, d),
          "conv1x1.1.bias": (e,),
          "fc_norm.weight": (h,),
          "fc_norm.bias": (h,),
          "head.weight": (self.num_classes, h),
          "head.bias": (self.num_classes,),
          "head_dist.weight": (self.num_classes, h),
          "head_dist.bias": (self.num_classes,),
        }
      )
    return {name: shapes[name] for name in self.expected_names()}

  @property
  def names_layout(self) -> str:
    """The `official_names` layout of the converted variables: the encoder is
    always under `encoder` (as in every stage's params), so an encoder-only
    checkpoint uses the 'mae' naming without a decoder."""
    return "classifier" if self.layout == "classifier" else "mae"

  # -- records ----------------------------------------------------------------
  def to_json(self) -> dict[str, Any]:
    record = dataclasses.asdict(self)
    record["assumed"] = list(self.assumed)
    return record

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> ModelSpec:
    record = dict(record)
    if record.get("decoder") is not None:
      record["decoder"] = DecoderSpec(**record["decoder"])
    record["assumed"] = tuple(record.get("assumed", ()))
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in known})

  def describe(self) -> str:
    heads = "?" if self.num_heads is None else str(self.num_heads)
    if "num_heads" in self.assumed:
      heads += " (assumed)"
    size = f"{self.image_size}" + (" (assumed)" if "image_size" in self.assumed else "")
    parts = [
      f"layout={self.layout}",
      f"width={self.width}",
      f"depth={self.depth}",
      f"heads={heads}",
      f"patch={self.patch_size}",
      f"image_size={size}",
      f"in_chans={self.in_chans}",
      f"mlp_ratio={self.mlp_ratio:g}",
      f"pos_embed={self.pos_embed}",
      f"final_norm={self.final_norm}",
      f"dtype={self.dtype}",
    ]
    if self.dist_token:
      parts.append("dist_token=True")
    if self.layer_scale:
      parts.append("layer_scale=True")
    if self.layout == "classifier":
      parts += [f"pooling={self.pooling}", f"num_classes={self.num_classes}"]
      if self.extra_width:
        parts.append(f"extra_width={self.extra_width}")
    if self.decoder is not None:
      dh = str(self.decoder.num_heads) + (
        " (assumed)" if "decoder.num_heads" in self.assumed else ""
      )
      parts += [f"decoder=(width={self.decoder.width}, depth={self.decoder.depth}, heads={dh})"]
    return " ".join(parts)

  def require_heads(self, what: str = "building the model") -> int:
    if self.num_heads is None:
      raise LayoutError(
        f"{what} needs the number of attention heads, which a checkpoint does not "
        f"store and width {self.width} has no standard value for; pass "
        f"--num_heads=N (num_heads=N), a divisor of {self.width}"
      )
    return self.num_heads


def _block_shapes(prefix: str, depth: int, d: int, hidden: int) -> dict[str, tuple]:
  per = {
    "norm1.weight": (d,),
    "norm1.bias": (d,),
    "attn.qkv.weight": (3 * d, d),
    "attn.qkv.bias": (3 * d,),
    "attn.proj.weight": (d, d),
    "attn.proj.bias": (d,),
    "norm2.weight": (d,),
    "norm2.bias": (d,),
    "mlp.fc1.weight": (hidden, d),
    "mlp.fc1.bias": (hidden,),
    "mlp.fc2.weight": (d, hidden),
    "mlp.fc2.bias": (d,),
  }
  return {f"{prefix}.{i}.{leaf}": shape for i in range(depth) for leaf, shape in per.items()}


# -----------------------------------------------------------------------------
# Detection
# -----------------------------------------------------------------------------
def _preview(names: Sequence[str], limit: int = 8) -> str:
  names = list(names)
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _block_indices(names: Iterable[str], prefix: str) -> list[int]:
  pattern = re.compile(rf"^{prefix}\.(\d+)\.")
  return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


def _count_blocks(names: Sequence[str], prefix: str) -> int:
  indices = _block_indices(names, prefix)
  if indices and indices != list(range(len(indices))):
    gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
    raise LayoutError(
      f"the checkpoint's {prefix} are numbered {indices[0]}..{indices[-1]} with "
      f"{prefix} {gaps[:8]} missing; the file is incomplete (a truncated or pruned "
      "state dict?)"
    )
  return len(indices)


def _shape(shapes: Mapping[str, Sequence[int]], name: str) -> tuple[int, ...]:
  return tuple(int(s) for s in shapes[name])


def _heads(
  width: int, given: int | None, what: str, default: int | None
) -> tuple[int | None, bool]:
  """(heads, assumed?)"""
  if given is not None:
    if given <= 0 or width % given:
      raise LayoutError(
        f"{what} num_heads={given} does not divide the width {width}; pick a divisor of {width}"
      )
    return int(given), False
  return default, default is not None


def detect(
  shapes: Mapping[str, Sequence[int]],
  *,
  dtypes: Mapping[str, Any] | None = None,
  layout: str | None = None,
  num_heads: int | None = None,
  image_size: int | None = None,
  decoder_num_heads: int | None = None,
  pos_embed: str | None = None,
) -> ModelSpec:
  """The model an official-named state dict describes (`name -> shape`).

  Arguments other than `shapes` override or complete the detection: `layout`
  must agree with the tensors (it can drop a decoder or head: 'vit' from a
  'mae' file keeps the encoder), `num_heads` / `decoder_num_heads` are
  needed for non-standard widths, `image_size` when there is no `pos_embed`,
  `pos_embed` ('fixed' | 'learned', default: learned for classifiers, as in
  fine-tuning, else the fixed sin-cos buffer of pre-training).
  """
  shapes = {canonical_name(n): v for n, v in shapes.items()}
  names = list(shapes)
  if layout is not None and layout not in LAYOUTS:
    raise LayoutError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
  if pos_embed is not None and pos_embed not in POS_EMBED_TYPES:
    raise LayoutError(f"unknown pos_embed type {pos_embed!r}; use one of {POS_EMBED_TYPES}")
  if "reg_token" in shapes:
    raise LayoutError(
      f"the checkpoint has register tokens (reg_token {tuple(shapes['reg_token'])}: a timm ViT "
      "built with reg_tokens=N), which mimdistill's ViT does not have; converting without them "
      "would change every output"
    )
  if "cls_token" not in shapes and "patch_embed.proj.weight" in shapes and "pos_embed" in shapes:
    raise LayoutError(
      "the checkpoint has no cls_token: a timm ViT built with class_token=False, which "
      "mimdistill's ViT (always a CLS token first) cannot hold"
    )
  if "cls_token" not in shapes or "patch_embed.proj.weight" not in shapes:
    missing = [n for n in ("cls_token", "patch_embed.proj.weight") if n not in shapes]
    raise LayoutError(
      f"no {' / '.join(missing)} tensor: this is not a ViT state dict with MAE / TinyMIM "
      f"/ timm names (it has {len(names)} tensors: {_preview(names)})"
    )
  assumed: list[str] = []

  cls = _shape(shapes, "cls_token")
  if len(cls) != 3 or cls[:2] != (1, 1):
    raise LayoutError(f"cls_token has shape {cls}, expected (1, 1, width)")
  width = cls[2]
  pe = _shape(shapes, "patch_embed.proj.weight")
  if len(pe) != 4 or pe[0] != width or pe[2] != pe[3]:
    raise LayoutError(
      f"patch_embed.proj.weight has shape {pe}, expected ({width}, in_chans, p, p) "
      "with square patches"
    )
  in_chans, patch = pe[1], pe[2]
  dist_token = "dist_token" in shapes
  if dist_token and _shape(shapes, "dist_token") != (1, 1, width):
    raise LayoutError(
      f"dist_token has shape {_shape(shapes, 'dist_token')}, expected (1, 1, {width})"
    )
  prefix = 2 if dist_token else 1

  if "pos_embed" in shapes:
    pos = _shape(shapes, "pos_embed")
    if (
      len(pos) == 3
      and pos[1] > 1
      and math.isqrt(pos[1]) ** 2 == pos[1]
      and math.isqrt(pos[1] - prefix) ** 2 != pos[1] - prefix
    ):
      raise LayoutError(
        f"pos_embed {pos} has a row per patch and none for the CLS token: a timm ViT built with "
        "no_embed_class=True (the CLS token gets no position embedding), which mimdistill's "
        "ViT does not do; its outputs would differ"
      )
    grid = math.isqrt(max(pos[1] - prefix, 0)) if len(pos) == 3 else -1
    if (
      len(pos) != 3 or pos[0] != 1 or pos[2] != width or grid * grid != pos[1] - prefix or grid == 0
    ):
      tokens = "CLS and distillation tokens" if dist_token else "a CLS token"
      raise LayoutError(
        f"pos_embed has shape {pos}; expected (1, {prefix} + grid**2, {width}) for a square "
        f"image with {tokens}"
      )
    if image_size is not None and image_size != grid * patch:
      raise LayoutError(
        f"image_size={image_size} was asked for, but the checkpoint's pos_embed is for "
        f"{grid * patch}x{grid * patch} images ({grid}x{grid} patches of {patch}); convert "
        "at the checkpoint's size and let fine-tuning resize the position embedding "
        "(bicubic, as MAE's interpolate_pos_embed)"
      )
    image_size = grid * patch
  elif image_size is None:
    image_size = DEFAULT_IMAGE_SIZE
    assumed.append("image_size")
  if image_size % patch:
    raise LayoutError(f"image_size={image_size} is not a multiple of the patch size {patch}")

  depth = _count_blocks(names, "blocks")
  if depth == 0:
    raise LayoutError("the checkpoint has no blocks.<i> tensors: not a ViT encoder")
  fc1 = shapes.get("blocks.0.mlp.fc1.weight")
  if fc1 is None:
    raise LayoutError("blocks.0.mlp.fc1.weight is missing; the checkpoint is incomplete")
  hidden = int(fc1[0])
  mlp_ratio = hidden / width
  layer_scale = "blocks.0.gamma_1" in shapes or "blocks.0.gamma_2" in shapes

  has_decoder = any(n.startswith(("decoder_", "mask_token")) for n in names)
  has_head = any(n.startswith(("head.", "fc_norm.", "head_dist.")) for n in names)
  if has_decoder and has_head:
    raise LayoutError(
      "the checkpoint has both an MAE decoder and a classifier head; no official model has both"
    )
  found = "mae" if has_decoder else "classifier" if has_head else "vit"
  if layout is None:
    layout = found
  elif layout != found and not (layout == "vit" and found != "vit"):
    raise LayoutError(
      f"layout={layout!r} was asked for, but the tensors hold a {found!r} checkpoint; "
      f"use layout={found!r} (or 'vit' to keep only the encoder)"
    )

  heads, heads_assumed = _heads(width, num_heads, "encoder", DEFAULT_HEADS.get(width))
  if heads_assumed:
    assumed.append("num_heads")

  decoder = None
  if layout == "mae":
    if "decoder_embed.weight" not in shapes or "decoder_pred.weight" not in shapes:
      raise LayoutError(
        "the checkpoint has decoder tensors but no decoder_embed.weight / "
        "decoder_pred.weight; the MAE decoder is incomplete"
      )
    dwidth = int(shapes["decoder_embed.weight"][0])
    ddepth = _count_blocks(names, "decoder_blocks")
    out_dim = int(shapes["decoder_pred.weight"][0])
    if out_dim != patch * patch * in_chans:
      raise LayoutError(
        f"decoder_pred predicts {out_dim} values per patch, expected "
        f"patch**2 * in_chans = {patch * patch * in_chans}"
      )
    dfc1 = shapes.get("decoder_blocks.0.mlp.fc1.weight")
    if dfc1 is not None and int(dfc1[0]) != int(dwidth * mlp_ratio):
      raise LayoutError(
        f"the decoder's MLP ratio {int(dfc1[0]) / dwidth:g} differs from "
        f"the encoder's {mlp_ratio:g}; mimdistill's MAE uses one ratio"
      )
    default = DEFAULT_DECODER_HEADS if dwidth % DEFAULT_DECODER_HEADS == 0 else None
    dheads, dassumed = _heads(dwidth, decoder_num_heads, "decoder", default)
    if dassumed:
      assumed.append("decoder.num_heads")
    if dheads is None:
      raise LayoutError(
        f"the MAE decoder is {dwidth} wide, which has no standard head "
        "count; pass --decoder_num_heads=N"
      )
    decoder = DecoderSpec(dwidth, ddepth, dheads, out_dim)

  pooling = num_classes = None
  extra_width = 0
  final_norm = "norm.weight" in shapes
  if layout == "classifier":
    if "head.weight" not in shapes:
      raise LayoutError(
        "the checkpoint has fc_norm but no head.weight; a classifier needs its head"
      )
    num_classes = int(shapes["head.weight"][0])
    if dist_token and "head_dist.weight" not in shapes:
      raise LayoutError(
        "the checkpoint has a dist_token and a head but no head_dist.weight; a DeiT "
        "distilled classifier has both heads"
      )
    if "head_dist.weight" in shapes and not dist_token:
      raise LayoutError(
        "the checkpoint has head_dist but no dist_token; DeiT's distillation head reads "
        "the distillation token"
      )
    if "conv1x1.1.weight" in shapes:
      extra_width = int(shapes["conv1x1.1.weight"][0])
    if "fc_norm.weight" in shapes:
      if final_norm:
        raise LayoutError(
          "the checkpoint has both the encoder norm and fc_norm; mimdistill's classifier "
          "(MAE models_vit) has fc_norm after average pooling and no encoder norm, or the "
          "encoder norm and CLS pooling"
        )
      pooling = "avg"
    else:
      pooling = "cls"
      if not final_norm:
        raise LayoutError(
          "a CLS-pooling classifier (head without fc_norm) needs the encoder "
          "norm, which the checkpoint lacks"
        )

  if pos_embed is None:
    pos_embed = "learned" if layout == "classifier" else "fixed"
  dtype = "float32"
  if dtypes:
    kinds = {str(v) for v in dtypes.values()}
    dtype = kinds.pop() if len(kinds) == 1 else "mixed"
  return ModelSpec(
    layout=layout,
    width=width,
    depth=depth,
    num_heads=heads,
    patch_size=patch,
    image_size=image_size,
    in_chans=in_chans,
    mlp_ratio=mlp_ratio,
    final_norm=final_norm,
    pos_embed=pos_embed,
    pooling=pooling,
    num_classes=num_classes,
    decoder=decoder,
    dtype=dtype,
    assumed=tuple(assumed),
    dist_token=dist_token,
    layer_scale=layer_scale,
    extra_width=extra_width,
  )


@dataclasses.dataclass
class NameCheck:
  """The checkpoint's names against the detected model's."""

  used: list[str]
  missing: list[str]  # expected, absent from the checkpoint
  dropped: dict[str, str]  # present, left out by the layout -> why
  unexpected: dict[str, str]  # present, no place in the model -> why
  wrong_shape: dict[str, tuple]  # name -> (checkpoint shape, expected shape)


def check_names(spec: ModelSpec, shapes: Mapping[str, Sequence[int]]) -> NameCheck:
  """`shapes` by canonical names (`official_names.canonical_name`)."""
  expected = spec.expected_shapes()
  used, dropped, unexpected, wrong = [], {}, {}, {}
  for name, shape in shapes.items():
    if name not in expected:
      why = _dropped_by_layout(name, spec)
      if why:
        dropped[name] = why
      else:
        unexpected[name] = why_unexpected(name)
    elif tuple(int(s) for s in shape) != expected[name]:
      wrong[name] = (tuple(int(s) for s in shape), expected[name])
    else:
      used.append(name)
  missing = [n for n in expected if n not in shapes]
  return NameCheck(used, missing, dropped, unexpected, wrong)


def _dropped_by_layout(name: str, spec: ModelSpec) -> str | None:
  if name.startswith(("decoder_", "mask_token")) and spec.layout != "mae":
    return f"MAE decoder, not kept by the '{spec.layout}' layout"
  if (
    name.startswith(("head.", "fc_norm.", "head_dist.", "conv1x1.")) and spec.layout != "classifier"
  ):
    return f"classifier head, not kept by the '{spec.layout}' layout"
  return None


def why_unexpected(name: str) -> str:
  for pattern, what in _UNSUPPORTED_HINTS:
    if pattern.search(name):
      return f"{what}: not part of mimdistill's ViT"
  return "not a tensor of the detected model"
