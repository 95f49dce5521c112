"""CAE v2 (Context Autoencoder with CLIP target, arXiv 2211.09799) as the
official engine computes it (Atten4Vis/CAE `models/modeling_cae.py`
`ContextAutoencoderViT` with model_type 'caev2', `models/modeling_cae_helper.py`).

  encoder     a ViT on the visible patches only (the `encoder` field, a
              `ViTEncoder` that `models.factory.cae_v2` builds with BEiT-style
              layer scale `gamma_1/gamma_2`, q/v biases, CAE's fixed sin-cos
              position embedding, whose first half of the channels encodes
              the row): `x[~mask]` in raster order, CLS prepended, final norm;
  projection  `encoder_to_regresser` Linear + `encoder_to_regresser_norm`
              LayerNorm on every encoder token, only when the regressor width
              differs from the encoder's;
  regressor   `regresser.regressor_blocks`: cross-attention blocks whose
              queries are the masked positions. The query stream starts as
              the `mask_token`; each block computes
                x = x_q + gamma_1_cross * CrossAttn(q = norm1_q(x_q + pos_q),
                      k = norm1_k(x_kv + pos_k), v = norm1_v(x_kv))
                x = norm2_cross(x);  x = x + gamma_2_cross * mlp_cross(x)
              with x_kv = [visible latents without CLS, current queries] and
              pos_k = [pos_visible, pos_masked], positions from the fixed
              `rd_pos_embed` (added to the query and key inputs only, never
              to the stream). q / k / v are separate bias-free Linears plus
              `q_bias` / `v_bias` (the key bias is zero). `regresser.norm`
              exists in the official model but is not applied for CAE v2:
              its parameters get no gradient (`NO_GRAD_PARAMS`);
  head        `decoder.norm` (one LayerNorm shared by all tokens) applied to
              CLS, the visible latents and the regressed latents separately,
              concatenated `[cls, visible, masked]`, then `decoder.head`
              Linear to the teacher width; the outputs are L2-normalised
              (no epsilon).

The official script builds the regressor with its constructor defaults
whatever the command line says (`get_model` passes neither
--decoder_num_heads nor --decoder_layer_scale_init_value): 12 heads and
layer scale 0.1; `regressor_heads` / `regressor_layer_scale` default to
those and can be changed. A regressor layer scale of 0 gives frozen unit
gammas (`fixed` collection), as the official `requires_grad=False` ones.
The regressor's heads need not divide its width: like the official
`CrossAttention`, q / k / v then project to `heads * (width // heads)`.
Stochastic depth is `linspace(0, drop_path, depth)` over the encoder and,
separately, over the regressor, as the official model builds it.

Params: `encoder` (a ViTEncoder's params, so a fine-tuning stage restores it
by name), `encoder_to_regresser`, `encoder_to_regresser_norm`, `regresser`
(`regressor_blocks_<i>`, `norm`), `mask_token`, `decoder` (`norm`, `head`);
fixed: `encoder/pos_embed`, `rd_pos_embed`. `mimdistill.interop.cae_names`
maps them to the official names.

Initialisation (`init_variables`) is the official one: every Linear
xavier-uniform with zero bias (the outer `_init_weights` overrides the inner
truncated normals), LayerNorm 1/0, the patch-embedding conv, `cls_token` and
`mask_token` from timm's `trunc_normal_(std=0.02, a=-0.02, b=0.02)` (CAE
truncates at one standard deviation) with a zero conv bias, layer scales at
their init values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models.vit import Mlp, ViTEncoder, dense_init, drop_path_rates, layer_norm

Dtype = Any

# Flax paths (regex, as training.optimizer.regex_mask reads them) of the
# parameters CAE v2 never uses: no gradient, no update, no weight decay.
NO_GRAD_PARAMS = (r"regresser/norm/.*",)

# The official CAE v2 pre-training models (`cae_{tiny,small,base}_patch16_224_8k_vocab`
# with the project/CAEv2 scripts' flags): the encoder has 12 heads at EVERY
# size (ViT-T too: 192 / 12 = 16 channels per head, unlike timm's 3; the fine-tuning
# models cae_*_patch16_224 keep the 12), patch 16;
# the regressor width is --decoder_embed_dim (B: run_pretraining's default 768)
# and its depth --regressor_depth. Masked patches per size: data.block_masking.
PRETRAIN_SIZES = {
  "tiny": dict(width=192, depth=12, num_heads=12, regressor_width=96, regressor_depth=1),
  "small": dict(width=384, depth=12, num_heads=12, regressor_width=384, regressor_depth=1),
  "base": dict(width=768, depth=12, num_heads=12, regressor_width=768, regressor_depth=4),
}


def trunc_normal_init(std: float) -> nn.initializers.Initializer:
  """timm `trunc_normal_(std=std, a=-std, b=std)` as CAE calls it: a normal
  truncated at ONE standard deviation."""

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)

  return init


def mask_indices(mask: jax.Array, num_masked: int) -> tuple[jax.Array, jax.Array]:
  """`(visible_index (B, N - M), masked_index (B, M))`, each in raster order,
  from a boolean mask `(B, N)` or `(B, gh, gw)` with exactly `num_masked`
  True (masked) cells per row, as the official `x[~mask]` / `x[mask]` take
  them. `num_masked` is static: it fixes the shapes."""
  mask = jnp.asarray(mask).reshape(mask.shape[0], -1)
  n = mask.shape[1]
  if not 0 < num_masked < n:
    raise ValueError(
      f"num_masked={num_masked} must be in 1..{n - 1} for {n} patches (CAE v2 regresses "
      "at least one masked patch from at least one visible one)"
    )
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)
  return order[:, : n - num_masked], order[:, n - num_masked :]


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x[b, index[b]]` for `(B, N, D)` tokens and `(B, K)` indices."""
  return jnp.take_along_axis(x, index[..., None], axis=1)


class CrossAttention(nn.Module):
  """Official `CrossAttention`: separate bias-free q / k / v Linears plus
  learned `q_bias` / `v_bias` (zero key bias), `heads * (width // heads)`
  channels split into contiguous heads, q scaled by `head_dim ** -0.5`."""

  width: int
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    head_dim = self.width // self.num_heads
    if head_dim == 0:
      raise ValueError(f"regressor width {self.width} is smaller than its {self.num_heads} heads")
    all_dim = head_dim * self.num_heads
    dense = lambda: nn.Dense(all_dim, use_bias=False, dtype=self.dtype, kernel_init=dense_init)
    self.q, self.k, self.v = dense(), dense(), dense()
    if self.qkv_bias:
      self.q_bias = self.param("q_bias", nn.initializers.zeros, (all_dim,))
      self.v_bias = self.param("v_bias", nn.initializers.zeros, (all_dim,))
    self.proj = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init)

  def __call__(self, x, k, v):
    q, k, v = self.q(x), self.k(k), self.v(v)
    if self.qkv_bias:
      q = q + self.q_bias.astype(q.dtype)
      v = v + self.v_bias.astype(v.dtype)
    heads = self.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    q = q * (q.shape[-1] ** -0.5)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3)
    return self.proj(out.reshape(out.shape[0], out.shape[1], -1))


class RegressorBlock(nn.Module):
  """Official `RegressorBlock` (post-norm after the cross-attention)."""

  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale: float = 0.1  # 0: frozen unit gammas
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    self.norm1_q = layer_norm(dtype=self.dtype)
    self.norm1_k = layer_norm(dtype=self.dtype)
    self.norm1_v = layer_norm(dtype=self.dtype)
    self.norm2_cross = layer_norm(dtype=self.dtype)
    self.cross_attn = CrossAttention(self.width, self.num_heads, self.qkv_bias, dtype=self.dtype)
    self.mlp_cross = Mlp(int(self.width * self.mlp_ratio), dtype=self.dtype)
    shape = (self.width,)
    if self.layer_scale > 0:
      init = nn.initializers.constant(self.layer_scale)
      self.gamma_1_cross = self.param("gamma_1_cross", init, shape)
      self.gamma_2_cross = self.param("gamma_2_cross", init, shape)
    else:
      ones = lambda: jnp.ones(shape, jnp.float32)
      self._fixed_gammas = (
        self.variable("fixed", "gamma_1_cross", ones),
        self.variable("fixed", "gamma_2_cross", ones),
      )
    self.drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), rng_collection="drop_path")

  def _gamma(self, branch: int) -> jax.Array:
    if self.layer_scale > 0:
      return self.gamma_1_cross if branch == 0 else self.gamma_2_cross
    return self._fixed_gammas[branch].value

  def __call__(self, x_q, x_kv, pos_q, pos_k, train: bool = False):
    drop = lambda y: self.drop(y, deterministic=not train)
    attn = self.cross_attn(
      self.norm1_q(x_q + pos_q), self.norm1_k(x_kv + pos_k), self.norm1_v(x_kv)
    )
    x = x_q + drop(self._gamma(0).astype(attn.dtype) * attn)
    x = self.norm2_cross(x)
    return x + drop(self._gamma(1).astype(x.dtype) * self.mlp_cross(x))


class LatentRegresser(nn.Module):
  """Official `LatentRegresser`; its final `norm` is created (the official
  checkpoint has it) but, for CAE v2, never applied."""

  width: int
  depth: int
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  layer_scale: float = 0.1
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    rates = drop_path_rates(self.drop_path, self.depth)
    self.regressor_blocks = [
      RegressorBlock(
        self.width,
        self.num_heads,
        self.mlp_ratio,
        rates[i],
        self.layer_scale,
        self.qkv_bias,
        dtype=self.dtype,
      )
      for i in range(self.depth)
    ]
    self.norm = layer_norm(dtype=self.dtype)

  def __call__(self, x_masked, x_visible, pos_masked, pos_visible, train: bool = False):
    outputs = []
    pos_k = jnp.concatenate([pos_visible, pos_masked], axis=1)
    for block in self.regressor_blocks:
      x_kv = jnp.concatenate([x_visible, x_masked], axis=1)
      x_masked = block(x_masked, x_kv, pos_masked, pos_k, train=train)
      outputs.append(x_masked)
    if self.is_initializing():
      self.norm(x_masked)  # creates the official (unused) parameters only
    return x_masked, tuple(outputs)


class CAEv2Output(NamedTuple):
  encoder_out: jax.Array  # (B, 1 + N_vis, D) after the encoder's final norm
  regressor_input: jax.Array  # (B, 1 + N_vis, Dd) after encoder_to_regresser(_norm)
  regressor_blocks: tuple  # each block's output (B, N_mask, Dd)
  regressor_out: jax.Array  # (B, N_mask, Dd)
  latent_predict: jax.Array  # decoder.norm(regressor_out)
  head_logits: jax.Array  # (B, 1 + N, C) tokens [cls, visible, masked]
  outputs: jax.Array  # head_logits / ||head_logits||


class CAEv2(nn.Module):
  """CAE v2 student (see the module docstring). `encoder` is CAE's ViT
  (`models.factory.cae_v2` builds it through the factory's encoder builder:
  `pos_embed_type='cae_sincos'`, layer scale, `qkv_bias='qv'`); its params
  are the `encoder` subtree. `__call__` takes the visible and masked patch
  indices (`mask_indices`)."""

  encoder: ViTEncoder
  regressor_width: int = 768  # decoder_embed_dim
  regressor_depth: int = 4
  regressor_heads: int = 12
  regressor_layer_scale: float = 0.1  # decoder_layer_scale_init_value
  regressor_drop_path: float = 0.0  # the official model reuses drop_path_rate
  out_dim: int = 512  # num_out_dim, the teacher's token width
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @property
  def width(self) -> int:
    return self.encoder.width

  @property
  def patch_size(self) -> int:
    return self.encoder.patch_size

  @property
  def image_size(self) -> int:
    return self.encoder.image_size

  @property
  def in_chans(self) -> int:
    return self.encoder.in_chans

  @property
  def grid_size(self) -> int:
    return self.encoder.grid_size

  @property
  def num_patches(self) -> int:
    return self.encoder.num_patches

  @property
  def qkv_bias(self) -> bool:
    return self.encoder.qkv_bias == "qv"

  @property
  def projects(self) -> bool:
    return self.regressor_width != self.width

  def setup(self):
    if self.encoder.pos_embed_type not in ("cae_sincos", "sincos"):
      raise ValueError(
        f"CAE v2 encodes visible patches with a fixed sin-cos position embedding; the "
        f"encoder has pos_embed_type={self.encoder.pos_embed_type!r} (use 'cae_sincos')"
      )
    if self.projects:
      self.encoder_to_regresser = nn.Dense(
        self.regressor_width, dtype=self.dtype, kernel_init=dense_init
      )
      self.encoder_to_regresser_norm = layer_norm(dtype=self.dtype)
    self.rd_pos_embed = self.variable(
      "fixed",
      "rd_pos_embed",
      lambda: jnp.asarray(pos_embed_lib.cae_sincos_2d(self.regressor_width, self.grid_size)[None]),
    )
    self.regresser = LatentRegresser(
      self.regressor_width,
      self.regressor_depth,
      self.regressor_heads,
      self.encoder.mlp_ratio,
      self.regressor_drop_path,
      self.regressor_layer_scale,
      self.qkv_bias,
      dtype=self.dtype,
    )
    self.mask_token = self.param(
      "mask_token", trunc_normal_init(self.init_std), (1, 1, self.regressor_width)
    )
    self.decoder = CAEHead(self.out_dim, dtype=self.dtype)

  def __call__(self, images, visible_index, masked_index, *, train: bool = False) -> CAEv2Output:
    """NHWC `images` (the student's normalisation), `(B, N_vis)` and
    `(B, N_mask)` patch indices in raster order."""
    b = images.shape[0]
    if visible_index.shape[1] + masked_index.shape[1] != self.num_patches:
      raise ValueError(
        f"{visible_index.shape[1]} visible + {masked_index.shape[1]} masked patches != "
        f"the {self.num_patches} patches of a {self.image_size}px image with patch "
        f"{self.patch_size}"
      )
    tokens = self.encoder.embed_patches(images)  # position embedding included
    latent = self.encoder(images, train=train, tokens=gather_tokens(tokens, visible_index))
    x = latent
    if self.projects:
      x = self.encoder_to_regresser_norm(self.encoder_to_regresser(x))
    cls, visible = x[:, :1], x[:, 1:]
    pos = jnp.broadcast_to(
      self.rd_pos_embed.value[:, 1:].astype(x.dtype), (b, self.num_patches, x.shape[-1])
    )
    pos_visible, pos_masked = gather_tokens(pos, visible_index), gather_tokens(pos, masked_index)
    queries = jnp.broadcast_to(
      self.mask_token.astype(x.dtype), (b, masked_index.shape[1], x.shape[-1])
    )
    regressed, blocks = self.regresser(queries, visible, pos_masked, pos_visible, train=train)
    logits, latent_predict = self.decoder(cls, visible, regressed)
    outputs = logits.astype(jnp.float32)
    outputs = outputs / jnp.sqrt(jnp.sum(outputs * outputs, axis=-1, keepdims=True))
    return CAEv2Output(latent, x, blocks, regressed, latent_predict, logits, outputs)


class CAEHead(nn.Module):
  """Official `Decoder` with decoder_depth 0: one shared LayerNorm on the
  CLS, visible and regressed tokens (separately), then a Linear head."""

  out_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.norm = layer_norm(dtype=self.dtype)
    self.head = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init)

  def __call__(self, cls, visible, masked):
    latent_predict = self.norm(masked)
    x = jnp.concatenate([self.norm(cls), self.norm(visible), latent_predict], axis=1)
    return self.head(x), latent_predict


def fixed_variables(model: CAEv2) -> dict:
  """The `fixed` collection as numpy: both sin-cos tables (and unit gammas
  for a regressor without layer scale); a function of the architecture."""
  fixed: dict[str, Any] = {
    "encoder": {"pos_embed": model.encoder.initial_pos_embed()},
    "rd_pos_embed": pos_embed_lib.cae_sincos_2d(model.regressor_width, model.grid_size)[None],
  }
  if not model.regressor_layer_scale > 0:
    ones = np.ones((model.regressor_width,), np.float32)
    fixed["regresser"] = {
      f"regressor_blocks_{i}": {"gamma_1_cross": ones, "gamma_2_cross": ones}
      for i in range(model.regressor_depth)
    }
  return fixed


def init_variables(model: CAEv2, rng: jax.Array) -> dict:
  """`{'params', 'fixed'}` initialised as the official model (module
  docstring): the ViT encoder's own MAE-style patch embedding and CLS
  initialisers are replaced by CAE's truncated normals."""
  init_key, patch_key, cls_key = jax.random.split(rng, 3)
  n = model.num_patches
  images = jnp.zeros((1, model.image_size, model.image_size, model.in_chans), jnp.float32)
  visible = jnp.arange(n - 1, dtype=jnp.int32)[None]
  masked = jnp.asarray([[n - 1]], jnp.int32)
  variables = nn.unbox(jax.jit(model.init)(init_key, images, visible, masked))
  params = jax.tree_util.tree_map(lambda x: x, dict(variables["params"]))
  encoder = dict(params["encoder"])
  patch = dict(encoder["patch_embed"])
  trunc = trunc_normal_init(model.init_std)
  patch["kernel"] = trunc(patch_key, patch["kernel"].shape)
  patch["bias"] = jnp.zeros_like(patch["bias"])
  encoder["patch_embed"] = patch
  encoder["cls_token"] = trunc(cls_key, encoder["cls_token"].shape)
  params["encoder"] = encoder
  return {"params": params, "fixed": variables["fixed"]}
