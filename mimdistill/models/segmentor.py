"""mmseg's `EncoderDecoder` for TinyMIM's UperNet: backbone -> decode head
(UPerHead) and auxiliary head (FCNHead).

`EncoderDecoder(...)(images, train=...)` returns `{'decode': logits, 'aux':
logits}` (NHWC, at the resolution of the first feature map, stride 4 for
patch 16); `encode_decode` is mmseg's test-time forward: the decode logits
resized to the image (bilinear, align_corners=False). The loss
(`objectives.segmentation_loss`) resizes the logits to the labels itself.

In training, random parts draw from the rng collections 'dropout' (the
heads' Dropout2d) and 'drop_path' (the backbone's stochastic depth), and
BatchNorm statistics are updated in 'batch_stats' (`mutable=['batch_stats']`).

`build_segmentor(config)` makes one from a config-like mapping with
sections `backbone` (`SegmentationBackbone` fields), `decode_head`
(`UPerHead` fields), optional `auxiliary_head` (`FCNHead` fields; None or
absent: no auxiliary head) and an optional top-level `dtype`. The heads'
input channels follow from the backbone (Flax infers them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mimdistill.models.fcn_head import FCNHead
from mimdistill.models.resize import resize_bilinear
from mimdistill.models.segmentation_backbone import SegmentationBackbone
from mimdistill.models.uper_head import UPerHead


class EncoderDecoder(nn.Module):
  backbone: SegmentationBackbone
  decode_head: UPerHead
  auxiliary_head: FCNHead | None = None

  def __call__(self, images, *, train: bool = False) -> dict[str, Any]:
    feats = self.backbone(images, train=train)
    out = {"decode": self.decode_head(feats, train=train)}
    if self.auxiliary_head is not None:
      out["aux"] = self.auxiliary_head(feats, train=train)
    return out

  def with_features(self, images, *, train: bool = False) -> dict[str, Any]:
    """The forward plus the backbone's intermediates (`neck_in`,
    `features`, ...), for inspection and parity."""
    inter = self.backbone.intermediates(images, train=train)
    feats = inter["features"]
    out = {"decode": self.decode_head(feats, train=train), "backbone": inter}
    if self.auxiliary_head is not None:
      out["aux"] = self.auxiliary_head(feats, train=train)
    return out

  def encode_decode(self, images) -> Any:
    """mmseg `encode_decode` in eval mode: decode logits at the image size."""
    feats = self.backbone(images, train=False)
    logits = self.decode_head(feats, train=False)
    return resize_bilinear(logits, images.shape[1:3])


def build_segmentor(config: Mapping[str, Any]) -> EncoderDecoder:
  """An `EncoderDecoder` from `{'backbone': {...}, 'decode_head': {...},
  'auxiliary_head': {...} | None, 'dtype': ...}`."""
  config = dict(config)
  unknown = set(config) - {"backbone", "decode_head", "auxiliary_head", "dtype"}
  if unknown:
    raise ValueError(
      f"unknown segmentor config sections {sorted(unknown)}; use backbone, decode_head, "
      "auxiliary_head, dtype"
    )
  dtype = config.get("dtype") or jnp.float32
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)

  def section(name, cls):
    fields = dict(config[name])
    fields.setdefault("dtype", dtype)
    for key in ("out_indices", "pool_scales", "in_index"):
      if isinstance(fields.get(key), list):
        fields[key] = tuple(fields[key])
    try:
      return cls(**fields, parent=None)
    except TypeError as e:
      raise ValueError(f"segmentor config section {name!r}: {e}") from None

  if "backbone" not in config or "decode_head" not in config:
    raise ValueError("a segmentor config needs 'backbone' and 'decode_head' sections")
  backbone = section("backbone", SegmentationBackbone)
  decode = section("decode_head", UPerHead)
  aux = section("auxiliary_head", FCNHead) if config.get("auxiliary_head") else None
  return EncoderDecoder(backbone, decode, aux)
