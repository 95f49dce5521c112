"""CNN students built from a config section (a dict of fields).

`family` ('resnet' / 'convnext'; `type` is accepted as SparK's fixtures
spell it) picks the model; the other fields are the model's own:
  resnet:   depth (18/34/50/101/152 or 'resnet50'), block, layers, div,
            num_classes, drop_path_rate, zero_init_last_bn, dtype;
  convnext: variant ('tiny', 'small', ... or 'convnext_tiny'), depths, dims,
            num_classes, drop_path_rate, layer_scale_init_value,
            head_init_scale, dtype.
A `name` field (e.g. 'resnet50', 'convnext_tiny') alone also works. Fields
that describe something else (notes such as SparK's `name` text) are ignored
only if listed in `IGNORED`; any other unknown field is an error.

`CNNClassifier` is the fine-tuning / evaluation form: the dense network's
logits alone, with the network's own (timm-named) params at the top level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from mimdistill.models import variants
from mimdistill.models.convnext import ConvNeXt, resolve_variant
from mimdistill.models.resnet import ResNet, resolve_depth

FAMILIES = {"resnet": ResNet, "convnext": ConvNeXt}
IGNORED = ("family", "type", "name")
# The fields a config's CNN model section may set (`configs/common.py:
# cnn_section`); `drop_path` is the ViT sections' name for `drop_path_rate`.
SECTION_FIELDS = (
  "family",
  "depth",
  "block",
  "layers",
  "div",
  "variant",
  "depths",
  "dims",
  "drop_path",
  "zero_init_last_bn",
  "layer_scale_init_value",
  "head_init_scale",
)


def fields_of_section(section: Mapping[str, Any]) -> dict[str, Any]:
  """The model fields a config section sets (None = unset), for `build_cnn`."""
  fields = {k: section[k] for k in SECTION_FIELDS if k in section and section[k] is not None}
  div = fields.get("div", 1)
  if not isinstance(div, int) or div < 1:
    raise ValueError(f"model.div={div!r} must be an integer >= 1: every width is divided by it")
  if "drop_path" in fields:
    variants.check_drop_path(fields["drop_path"])
    fields["drop_path_rate"] = float(fields.pop("drop_path"))
  return fields


def family_of(fields: Mapping[str, Any]) -> str:
  family = fields.get("family", fields.get("type"))
  name = str(fields.get("name", "")).lower()
  if family is None and name.startswith("resnet"):
    family = "resnet"
  if family is None and name.startswith("convnext"):
    family = "convnext"
  if family is None or str(family).lower() not in FAMILIES:
    raise ValueError(f"unknown CNN family {family!r}; known: {sorted(FAMILIES)}")
  return str(family).lower()


def build_cnn(fields: Mapping[str, Any], **overrides) -> ResNet | ConvNeXt:
  """The model a config section describes; `overrides` win over `fields`."""
  fields = {**dict(fields), **overrides}
  family = family_of(fields)
  cls = FAMILIES[family]
  known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  kwargs = {k: v for k, v in fields.items() if k in known}
  unknown = sorted(set(fields) - known - set(IGNORED))
  if unknown:
    raise ValueError(f"unknown {family} fields {unknown}; known: {sorted(known)}")
  name = str(fields.get("name", "")).split(" ")[0].lower()
  if family == "resnet":
    if "depth" not in kwargs and not ("block" in kwargs and "layers" in kwargs) and name:
      kwargs["depth"] = name
    if "layers" in kwargs:
      kwargs["layers"] = tuple(kwargs["layers"])
    if kwargs.get("block") is None or kwargs.get("layers") is None:
      resolve_depth(kwargs.get("depth", 50))  # validates the depth now
  else:
    if "variant" not in kwargs and name:
      kwargs["variant"] = name
    for key in ("depths", "dims"):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    if kwargs.get("depths") is None or kwargs.get("dims") is None:
      resolve_variant(kwargs.get("variant", "tiny"))
  return cls(**kwargs)


class CNNClassifier(nn.Module):
  """`backbone` (a ResNet / ConvNeXt with `num_classes > 0`) run dense,
  returning its logits; the backbone's params are this module's own (shared
  scope), so the tree has timm's top-level names (`conv1`, ..., `fc`)."""

  backbone: ResNet | ConvNeXt

  def setup(self):
    if self.backbone.num_classes <= 0:
      raise ValueError("CNNClassifier needs a backbone with num_classes > 0")
    nn.share_scope(self, self.backbone)

  @property
  def num_classes(self) -> int:
    return self.backbone.num_classes

  def __call__(self, images, train: bool = False):
    return self.backbone(images, None, train).logits
