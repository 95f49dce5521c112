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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mimdistill.models.convnext import ConvNeXt, resolve_variant
from mimdistill.models.resnet import ResNet, resolve_depth

FAMILIES = {"resnet": ResNet, "convnext": ConvNeXt}
IGNORED = ("family", "type", "name")


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
