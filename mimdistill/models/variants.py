"""The named ViT variants: the project's one table of widths, depths, heads
and patch sizes, and the resolution of a config section into a complete
encoder spec.

A config's model section names a `variant` and may override any field
(`width`, `depth`, `num_heads`, `patch_size`, `image_size`, `mlp_ratio`,
`in_chans`); `resolve` returns the complete, validated set. The converter
reads the same table for the head count a checkpoint does not store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mimdistill.models.vit import DROP_PATH_SCHEDULES, POS_EMBED_TYPES, QKV_BIAS

# (width, depth, heads, patch) of ViT-T/S/B/L/H (timm, MAE, TinyMIM).
VARIANTS = {
  "tiny": (192, 12, 3, 16),
  "small": (384, 12, 6, 16),
  "base": (768, 12, 12, 16),
  "large": (1024, 24, 16, 16),
  "huge": (1280, 32, 16, 14),
}
# Heads of the standard widths: what a checkpoint of that width most likely
# used (heads only split the qkv projection, the weights do not record them).
STANDARD_HEADS = {width: heads for width, _, heads, _ in VARIANTS.values()}
# MAE's decoder for every released model: 512 wide, 8 blocks, 16 heads.
MAE_DECODER = (512, 8, 16)

_SPEC_FIELDS = ("width", "depth", "num_heads", "patch_size", "image_size", "mlp_ratio", "in_chans")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  width: int
  depth: int
  num_heads: int
  patch_size: int
  image_size: int = 224
  mlp_ratio: float = 4.0
  in_chans: int = 3

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def kwargs(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def resolve(model: Mapping[str, Any], section: str = "model") -> EncoderSpec:
  """Validated encoder spec from a model config section (`section`: its
  name in the config, for the errors)."""
  model = dict(model)
  variant = model.get("variant")
  if variant is not None and variant not in VARIANTS and variant != "custom":
    raise ValueError(
      f"unknown model variant {variant!r}; known: "
      f"{sorted(VARIANTS)} (or 'custom' with width/depth/num_heads)"
    )
  base = dict(
    zip(("width", "depth", "num_heads", "patch_size"), VARIANTS.get(variant, (None,) * 4))
  )
  for key in _SPEC_FIELDS:
    if model.get(key) is not None:
      base[key] = model[key]
  missing = [k for k in ("width", "depth", "num_heads", "patch_size") if base.get(k) is None]
  if missing:
    raise ValueError(f"model variant {variant!r} needs {missing} set in the config")
  spec = EncoderSpec(**{k: v for k, v in base.items() if v is not None})
  for key in ("width", "depth", "num_heads", "patch_size", "image_size", "in_chans"):
    value = getattr(spec, key)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{section}.{key}={value!r} must be a positive integer")
  if spec.image_size % spec.patch_size:
    raise ValueError(
      f"image_size={spec.image_size} is not divisible by patch_size="
      f"{spec.patch_size}; use a multiple of {spec.patch_size}"
    )
  ratio = spec.mlp_ratio
  if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or int(spec.width * ratio) < 1:
    raise ValueError(
      f"mlp_ratio={ratio!r} must be a number > 0 (the MLP is width * mlp_ratio wide; ViTs use 4.0)"
    )
  check_drop_path(model.get("drop_path"))
  # Checked here, with the sizes, so a stage refuses them before it loads a
  # teacher or reads data (the encoder itself checks them only when traced).
  for key, allowed in (
    ("qkv_bias", QKV_BIAS),
    ("pos_embed_type", POS_EMBED_TYPES),
    ("drop_path_schedule", DROP_PATH_SCHEDULES),
  ):
    if model.get(key) is not None and model[key] not in allowed:
      raise ValueError(f"{section}.{key}={model[key]!r} is not one of {allowed}")
  scale = model.get("layer_scale")
  if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
    raise ValueError(
      f"{section}.layer_scale={scale!r} must be a finite number (the initial value of the "
      "per-channel gammas; BEiT: 0.1) or None for none"
    )
  if spec.width % spec.num_heads:
    raise ValueError(f"width={spec.width} is not divisible by num_heads={spec.num_heads}")
  if spec.width % 4:
    raise ValueError(
      f"width={spec.width} must be a multiple of 4 for the 2-D sin-cos position embedding"
    )
  return spec


def check_drop_path(rate, field: str = "drop_path") -> None:
  """A stochastic-depth rate is a probability of skipping a block: in [0, 1)
  (None: unset). At 1 every block is skipped and nothing is learnt."""
  if rate is None:
    return
  if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ValueError(
      f"{field}={rate!r} must be in [0, 1): the probability of skipping a block (the fine-tuning "
      "recipes use 0.1)"
    )
