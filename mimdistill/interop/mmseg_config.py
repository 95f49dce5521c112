"""mmseg / TinyMIM segmentor configs (the dicts of the official config
files, as the fixtures' config.json records them) -> mimdistill's segmentor
model section (`models.factory.build("segmentor", section)`: the encoder's
fields at the top, `out_indices`, `neck`, `fc_dim`, and the `decode_head`
/ `auxiliary_head` subsections).

Official backbone arguments: `img_size`, `patch_size`, `embed_dim`,
`depth`, `num_heads`, `mlp_ratio`, `qkv_bias`, `init_values`,
`drop_path_rate`, `use_abs_pos_emb`, `use_rel_pos_bias`, `out_indices`
(TinyMIM `MAE`; type `TinyMIMStarT_MAE`, or a `fc_dim` / `_fc_dim...` key,
selects the TinyMIM*-T neck). Heads: UPerHead (`channels`, `pool_scales`,
`in_index`, `dropout_ratio`, `num_classes`) and FCNHead (`channels`,
`in_index`, `num_convs`, `concat_input`, `kernel_size`, `dilation`,
`dropout_ratio`, `num_classes`). Settings mimdistill does not implement
raise instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STAR_TYPES = ("TinyMIMStarT_MAE",)


def _fc_dim(args: Mapping[str, Any]) -> int | None:
  for key, value in args.items():
    if key == "fc_dim" or key.startswith("_fc_dim"):
      return int(value)
  return None


def _check(name: str, args: Mapping[str, Any], key: str, allowed) -> None:
  if key in args and args[key] not in allowed:
    raise ValueError(f"{name}.{key}={args[key]!r} is not supported (supported: {allowed})")


def backbone_fields(args: Mapping[str, Any], *, star: bool | None = None) -> dict[str, Any]:
  """The backbone part of a segmentor model section (encoder fields plus
  `out_indices`, `neck`, `fc_dim`) from the official backbone arguments."""
  if star is None:
    star = args.get("type") in STAR_TYPES or _fc_dim(args) is not None
  _check("backbone", args, "qk_scale", (None,))
  _check("backbone", args, "use_shared_rel_pos_bias", (False,))
  _check("backbone", args, "drop_rate", (0, 0.0))
  _check("backbone", args, "attn_drop_rate", (0, 0.0))
  fields = dict(
    width=int(args["embed_dim"]),
    depth=int(args["depth"]),
    num_heads=int(args["num_heads"]),
    patch_size=int(args.get("patch_size", 16)),
    image_size=int(args.get("img_size", 224)),
    in_chans=int(args.get("in_chans", 3)),
    mlp_ratio=float(args.get("mlp_ratio", 4.0)),
    drop_path=float(args.get("drop_path_rate", 0.0)),
    layer_scale=None if args.get("init_values") is None else float(args["init_values"]),
    rel_pos_bias=bool(args.get("use_rel_pos_bias", False)),
    pos_embed_type="learned" if args.get("use_abs_pos_emb", True) else "none",
    qkv_bias="fused" if args.get("qkv_bias", False) else "none",
    out_indices=tuple(int(i) for i in args.get("out_indices", (3, 5, 7, 11))),
    neck="tinymim_star" if star else "tinymim",
  )
  if star:
    fields["fc_dim"] = _fc_dim(args) or 1280
  return fields


def _head_common(name: str, args: Mapping[str, Any]) -> None:
  _check(name, args, "align_corners", (False,))
  norm = args.get("norm_cfg") or {}
  if norm and norm.get("type") not in ("BN", "SyncBN"):
    raise ValueError(f"{name}.norm_cfg type {norm.get('type')!r}: only BN / SyncBN")
  loss = args.get("loss_decode") or {}
  if loss and (loss.get("type") != "CrossEntropyLoss" or loss.get("use_sigmoid")):
    raise ValueError(f"{name}.loss_decode={loss}: only softmax CrossEntropyLoss")


def decode_head_fields(args: Mapping[str, Any]) -> dict[str, Any]:
  if args.get("type", "UPerHead") != "UPerHead":
    raise ValueError(f"decode_head type {args['type']!r}: only UPerHead")
  _head_common("decode_head", args)
  return dict(
    num_classes=int(args["num_classes"]),
    channels=int(args.get("channels", 768)),
    pool_scales=tuple(int(s) for s in args.get("pool_scales", (1, 2, 3, 6))),
    in_index=tuple(int(i) for i in args.get("in_index", (0, 1, 2, 3))),
    dropout_ratio=float(args.get("dropout_ratio", 0.1)),
  )


def auxiliary_head_fields(args: Mapping[str, Any]) -> dict[str, Any]:
  if args.get("type", "FCNHead") != "FCNHead":
    raise ValueError(f"auxiliary_head type {args['type']!r}: only FCNHead")
  _head_common("auxiliary_head", args)
  return dict(
    num_classes=int(args["num_classes"]),
    channels=int(args.get("channels", 256)),
    in_index=int(args.get("in_index", 2)),
    num_convs=int(args.get("num_convs", 2)),
    kernel_size=int(args.get("kernel_size", 3)),
    dilation=int(args.get("dilation", 1)),
    concat_input=bool(args.get("concat_input", True)),
    dropout_ratio=float(args.get("dropout_ratio", 0.1)),
  )


def loss_weights(segmentor: Mapping[str, Any]) -> dict[str, float]:
  """`{'decode': w, 'aux': w}` from the heads' `loss_decode.loss_weight`."""
  weights = {
    "decode": float(segmentor["decode_head"].get("loss_decode", {}).get("loss_weight", 1.0))
  }
  if segmentor.get("auxiliary_head"):
    aux = segmentor["auxiliary_head"].get("loss_decode", {})
    weights["aux"] = float(aux.get("loss_weight", 1.0))
  return weights


def segmentor_config(segmentor: Mapping[str, Any], *, star: bool | None = None) -> dict[str, Any]:
  """The segmentor model section of an official EncoderDecoder config."""
  if segmentor.get("type", "EncoderDecoder") != "EncoderDecoder":
    raise ValueError(f"segmentor type {segmentor['type']!r}: only EncoderDecoder")
  config = {
    **backbone_fields(segmentor["backbone"], star=star),
    "decode_head": decode_head_fields(segmentor["decode_head"]),
    "auxiliary_head": None,
  }
  if segmentor.get("auxiliary_head"):
    config["auxiliary_head"] = auxiliary_head_fields(segmentor["auxiliary_head"])
  return config
