"""Official constructor arguments -> mimdistill model config sections, so
that the parity kinds build their models through the factory like the
stages do."""

from __future__ import annotations


def vit_section(args: dict, **fields) -> dict:
  """A model section from timm / MAE / TinyMIM ViT arguments (`embed_dim`,
  `depth`, `num_heads`, `patch_size`, `img_size`, ...)."""
  eps = args.get("norm_layer_eps", 1e-6)
  if abs(eps - 1e-6) > 1e-12:
    raise ValueError(
      f"norm_layer_eps={eps}: mimdistill's LayerNorm uses 1e-6 as every official model does"
    )
  return {
    "variant": "custom",
    "width": args["embed_dim"],
    "depth": args["depth"],
    "num_heads": args["num_heads"],
    "patch_size": args["patch_size"],
    "image_size": args["img_size"],
    "in_chans": args.get("in_chans", 3),
    "mlp_ratio": args.get("mlp_ratio", 4.0),
    **fields,
  }


def mae_section(args: dict) -> dict:
  """A model section with the decoder of `MaskedAutoencoderViT` arguments."""
  decoder = {
    "width": args["decoder_embed_dim"],
    "depth": args["decoder_depth"],
    "num_heads": args["decoder_num_heads"],
  }
  return vit_section(args, decoder=decoder)
