"""The CLIP image tower as CAE v2's teacher (OpenAI CLIP `VisionTransformer`).

Reproduces `clip/modeling_clip_helper.py` of Atten4Vis/CAE (the same layer
layout as openai/CLIP `model.py`):

  conv1 (patch embedding, no bias) -> prepend `class_embedding` -> add the
  learned `positional_embedding` -> `ln_pre` -> `transformer.resblocks`
  (`x + out_proj(MHA(ln_1 x))`, `x + c_proj(QuickGELU(c_fc(ln_2 x)))`) ->
  `ln_post` and `@ proj` on ALL tokens.

CAE's copy applies `ln_post` and `proj` to every token (openai/CLIP only to
the CLS token); those projected tokens are the CAE v2 target. LayerNorms use
eps 1e-5 and always compute in float32, cast back to the input dtype (CLIP's
fp16-safe `LayerNorm`). Attention is `nn.MultiheadAttention`: one fused
`in_proj` (3W, W) whose rows are q, k, v, each split into `heads` contiguous
channel groups, q scaled by `head_dim ** -0.5`.

Params mirror the OpenAI names (`mimdistill.interop.clip_names` maps them):
`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
`transformer/resblocks_<i>/{ln_1, attn/{in_proj, out_proj}, ln_2,
mlp/{c_fc, c_proj}}`, `ln_post`, `proj` (width, output_dim), the same
orientation as torch's `x @ proj`.

Two open_clip options that its `VisionTransformer` exposes and that live in
the weights are supported: per-block layer scale (`ls_1/gamma`,
`ls_2/gamma`) and no `ln_pre`. The activation is NOT in the weights: OpenAI's
released towers use QuickGELU (`act='quick_gelu'`, the default); open_clip
towers trained without `-quickgelu` use exact GELU (`act='gelu'`).

The released OpenAI files keep the Linear / Conv / MHA weights and `proj` in
float16 and the embeddings and LayerNorms in float32; the importer upcasts
them to float32, which is what `clip.modeling_clip.load` computes with on a
CPU device (`model.float()`). On a GPU the official teacher runs in float16;
`dtype` gives the same choice here (params stay float32).

The tower is a frozen teacher loaded from weights, so its initialisers only
matter for tests; they follow CLIP's `initialize_parameters` scales.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models import pos_embed as pos_embed_lib

Dtype = Any

# OpenAI CLIP's image normalisation (clip.py `_transform`; CAE v2's
# `visual_token_transform` for discrete_vae_type 'clip').
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = ("quick_gelu", "gelu")


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU: `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


def l2_normalize(x: jax.Array) -> jax.Array:
  """`x / x.norm(dim=-1, keepdim=True)` without an epsilon, as CAE v2 does."""
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def clip_layer_norm(name: str | None = None) -> nn.LayerNorm:
  """CLIP's `LayerNorm` (eps 1e-5), float32 compute; `apply_norm` casts."""
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32, name=name)


def apply_norm(norm: nn.Module, x: jax.Array) -> jax.Array:
  """CLIP's fp16-safe LayerNorm: normalise in float32, return x's dtype."""
  return norm(x.astype(jnp.float32)).astype(x.dtype)


class MultiheadAttention(nn.Module):
  """torch `nn.MultiheadAttention(width, heads)` used as self-attention."""

  width: int
  heads: int
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.width % self.heads:
      raise ValueError(f"CLIP width {self.width} is not divisible by {self.heads} heads")
    self.in_proj = nn.Dense(
      3 * self.width,
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.zeros,
    )
    self.out_proj = nn.Dense(self.width, dtype=self.dtype, bias_init=nn.initializers.zeros)

  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.heads
    q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
    split = lambda t: t.reshape(b, n, self.heads, hd).transpose(0, 2, 1, 3)
    q, k, v = split(q) * hd**-0.5, split(k), split(v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return self.out_proj(out)


class LayerScale(nn.Module):
  """open_clip `LayerScale`: a learned per-channel `gamma`."""

  width: int
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (self.width,))
    return x * gamma.astype(x.dtype)


class ClipMlp(nn.Module):
  width: int
  hidden: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fc_std = (2 * self.width) ** -0.5
    x = nn.Dense(
      self.hidden, dtype=self.dtype, kernel_init=nn.initializers.normal(fc_std), name="c_fc"
    )(x)
    x = quick_gelu(x) if self.act == "quick_gelu" else nn.gelu(x, approximate=False)
    return nn.Dense(self.width, dtype=self.dtype, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  """CLIP `ResidualAttentionBlock` (pre-norm, no dropout, no drop path),
  with open_clip's optional layer scale `ls_1` / `ls_2`."""

  width: int
  heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  layer_scale: float | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.ln_1 = clip_layer_norm()
    self.attn = MultiheadAttention(self.width, self.heads, dtype=self.dtype)
    self.ln_2 = clip_layer_norm()
    self.mlp = ClipMlp(self.width, int(self.width * self.mlp_ratio), self.act, dtype=self.dtype)
    if self.layer_scale is not None:
      self.ls_1 = LayerScale(self.width, self.layer_scale)
      self.ls_2 = LayerScale(self.width, self.layer_scale)

  def __call__(self, x):
    attn = self.attn(apply_norm(self.ln_1, x))
    if self.layer_scale is not None:
      attn = self.ls_1(attn)
    x = x + attn
    mlp = self.mlp(apply_norm(self.ln_2, x))
    if self.layer_scale is not None:
      mlp = self.ls_2(mlp)
    return x + mlp


class ClipTransformer(nn.Module):
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  layer_scale: float | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.resblocks = [
      ResidualAttentionBlock(
        self.width, self.heads, self.mlp_ratio, self.act, self.layer_scale, dtype=self.dtype
      )
      for _ in range(self.layers)
    ]

  def __call__(self, x):
    outputs = []
    for block in self.resblocks:
      x = block(x)
      outputs.append(x)
    return outputs


class ClipVisualOutput(NamedTuple):
  patch_embed: jax.Array  # (B, L, width) conv1 output, raster order
  after_ln_pre: jax.Array  # (B, 1 + L, width)
  blocks: tuple  # each resblock's output (B, 1 + L, width)
  tokens_ln_post: jax.Array  # (B, 1 + L, width) every token after ln_post
  tokens_proj: jax.Array  # (B, 1 + L, output_dim) ln_post(x) @ proj: the CAE v2 target


class ClipVisual(nn.Module):
  """CLIP `VisionTransformer` as CAE v2 runs it (see the module docstring).

  `image_size` is CLIP's `input_resolution`; `heads` is not in the weights
  (OpenAI's `build_model` uses width // 64).
  """

  width: int
  layers: int
  heads: int
  patch_size: int
  image_size: int
  output_dim: int
  mlp_ratio: float = 4.0
  act: str = "quick_gelu"
  layer_scale: float | None = None  # open_clip ls_init_value; None: no ls_1/ls_2
  pre_norm: bool = True  # False: open_clip's no_ln_pre
  dtype: Dtype = jnp.float32

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def setup(self):
    if self.act not in ACTIVATIONS:
      raise ValueError(f"unknown CLIP activation {self.act!r}; use one of {ACTIVATIONS}")
    if self.image_size % self.patch_size:
      raise ValueError(
        f"CLIP input resolution {self.image_size} is not divisible by patch size {self.patch_size}"
      )
    p = self.patch_size
    scale = self.width**-0.5
    self.conv1 = nn.Conv(
      self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype
    )
    self.class_embedding = self.param(
      "class_embedding", nn.initializers.normal(scale), (self.width,)
    )
    self.positional_embedding = self.param(
      "positional_embedding", nn.initializers.normal(scale), (self.num_patches + 1, self.width)
    )
    if self.pre_norm:
      self.ln_pre = clip_layer_norm()
    self.transformer = ClipTransformer(
      self.width,
      self.layers,
      self.heads,
      self.mlp_ratio,
      self.act,
      self.layer_scale,
      dtype=self.dtype,
    )
    self.ln_post = clip_layer_norm()
    self.proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))

  def __call__(self, images: jax.Array) -> ClipVisualOutput:
    """NHWC images normalised with `CLIP_MEAN` / `CLIP_STD`."""
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(
        f"CLIP tower built for {self.image_size}x{self.image_size} images got {h}x{w}; "
        "resize its positional embedding (models.clip.resize_positional_embedding) and "
        "build it with that image_size"
      )
    patches = self.conv1(images.astype(self.dtype)).reshape(b, -1, self.width)
    cls = jnp.broadcast_to(self.class_embedding.astype(patches.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, patches], axis=1)
    x = x + self.positional_embedding.astype(x.dtype)
    if self.pre_norm:
      x = apply_norm(self.ln_pre, x)
    blocks = self.transformer(x)
    y = apply_norm(self.ln_post, blocks[-1] if blocks else x)
    proj = y @ self.proj.astype(y.dtype)
    return ClipVisualOutput(patches, x, tuple(blocks), y, proj)


def resize_positional_embedding(posemb: np.ndarray, new_grid: int) -> np.ndarray:
  """CAE's `clip.modeling_clip_helper.resize_pos_embed`: the class row kept,
  the grid rows reshaped to (1, g, g, W) -> NCHW, `F.interpolate(mode=
  'bilinear')` (align_corners=False) to `new_grid` x `new_grid`, back to
  rows. `(1 + g*g, W)` -> `(1 + new_grid**2, W)`."""
  return pos_embed_lib.resize_pos_embed(
    np.asarray(posemb, np.float32), new_grid, num_extra_tokens=1, mode="bilinear"
  )
