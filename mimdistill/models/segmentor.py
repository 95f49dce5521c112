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

`models.factory.build("segmentor", section, num_classes=K)` makes one
from a model section (the encoder's fields, `out_indices`, `neck`,
`fc_dim`, and the `decode_head` / `auxiliary_head` subsections). The
heads' input channels follow from the backbone (Flax infers them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

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
