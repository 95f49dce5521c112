"""Vision Transformer encoder with MAE / TinyMIM / timm-0.3.2 semantics.

Params are a plain nested dict whose names mirror the official PyTorch names
(`patch_embed`, `cls_token`, `pos_embed`, `blocks_<i>/{norm1,attn/{qkv,proj},
norm2,mlp/{fc1,fc2}}`, `norm`), so converting checkpoints is a rename plus a
transpose (see `mimdistill.interop.official_names`).

Besides the plain forward the encoder offers what the three stages need:
  * `stop_after=k`: run blocks 1..k only (the frozen teacher never computes
    what it does not use);
  * `relation_qkv(...)`: q, k, v of block k split into R heads, where R is a
    property of the distillation, not of the block's own attention heads;
  * `tokens=`: an already-masked token sequence for MAE;
  * `block_outputs(images, indices)`: the token sequences after several
    blocks (segmentation backbones).

Options of the families built on it (all off by default, the MAE/TinyMIM
ViT): DeiT's distillation token (`dist_token`: tokens `[cls, dist,
patches]`), BEiT-style layer scale (`layer_scale`: per-block `gamma_1`,
`gamma_2`), q/v biases (`qkv_bias='qv'`), relative position bias
(`rel_pos_bias`: a table per block), no absolute position embedding
(`pos_embed_type='none'`).

Speed options, none of which changes the params: `dtype` (compute dtype;
params stay float32, attention softmax in float32), `fused_attention`
(`jax.nn.dot_product_attention`, cuDNN flash attention on GPU; the relation
methods always use the explicit qkv), `remat` (jax.checkpoint per block),
`scan_blocks` (the blocks under one `lax.scan` with params stacked on the
fly from `blocks_<i>`, so the block body compiles once; see
`run_block_stack`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.models import fusion_barrier
from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models import relative_position as relpos

Dtype = Any
QKV_BIAS = ("fused", "qv", "none")

# timm's `_init_weights`: xavier-uniform for every Linear (qkv included, whose
# fan_out is 3D), zero bias; LayerNorm 1/0.
dense_init = nn.initializers.xavier_uniform()
# MAE initialises the conv patch embedding "like nn.Linear": xavier on the
# flattened (D, C*p*p) matrix, i.e. fan_in = C*p*p and fan_out = D, not the
# conv fans (which would multiply fan_out by p*p).
patch_init = nn.initializers.variance_scaling(
  1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)


def torch_default_bias_init(fan_in: int) -> Callable:
  """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  # Two-pass variance: the "fast" E[x^2]-E[x]^2 form loses float32 digits
  # that the parity fixtures resolve.
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """`(B, N, D)` -> `(B, heads, N, D // heads)`."""
  b, n, d = x.shape
  if d % heads:
    raise ValueError(f"width {d} is not divisible by {heads} heads")
  return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection.

  `qkv_bias`: 'fused' (timm / MAE: the qkv Linear has a bias), 'qv' (BEiT /
  CAE: a bias-free qkv Linear plus learned `q_bias` and `v_bias`, the key
  bias fixed at zero) or 'none'. `rel_pos_grid` adds BEiT's relative position
  bias (a learned `relative_position_bias_table`, one column per head,
  indexed by `relative_position.relative_position_index`) for that patch grid
  and `num_prefix_tokens` CLS (and distillation) tokens.
  """

  num_heads: int
  width: int
  dtype: Dtype = jnp.float32
  fused: bool = False  # jax.nn.dot_product_attention (cuDNN flash on GPU)
  qkv_bias: str = "fused"
  rel_pos_grid: tuple[int, int] | None = None
  num_prefix_tokens: int = 1

  def setup(self):
    if self.qkv_bias not in QKV_BIAS:
      raise ValueError(f"qkv_bias={self.qkv_bias!r} is not one of {QKV_BIAS}")
    self.qkv = nn.Dense(
      3 * self.width, dtype=self.dtype, kernel_init=dense_init, use_bias=self.qkv_bias == "fused"
    )
    if self.qkv_bias == "qv":
      self.q_bias = self.param("q_bias", nn.initializers.zeros, (self.width,))
      self.v_bias = self.param("v_bias", nn.initializers.zeros, (self.width,))
    if self.rel_pos_grid is not None:
      rows = relpos.num_relative_distances(self.rel_pos_grid, self.num_prefix_tokens)
      # BEiT initialises the table at zero (its trunc_normal_ is commented out).
      self.relative_position_bias_table = self.param(
        "relative_position_bias_table", nn.initializers.zeros, (rows, self.num_heads)
      )
    self.proj = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init)

  def qkv_projection(self, x):
    """`(B, N, 3D)`: the fused projection with this attention's bias mode."""
    qkv = self.qkv(x)
    if self.qkv_bias == "qv":
      bias = jnp.concatenate([self.q_bias, jnp.zeros_like(self.q_bias), self.v_bias])
      qkv = qkv + bias.astype(qkv.dtype)
    return qkv

  def qkv_split(self, x, heads: int):
    """q, k, v each `(B, heads, N, D // heads)`; `heads` may differ from ours."""
    q, k, v = jnp.split(self.qkv_projection(x), 3, axis=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)

  def relative_bias(self, num_tokens: int) -> jax.Array | None:
    """`(heads, N, N)` float32 relative position bias, or None without one."""
    if self.rel_pos_grid is None:
      return None
    index = relpos.relative_position_index(self.rel_pos_grid, self.num_prefix_tokens)
    if index.shape[0] != num_tokens:
      raise ValueError(
        f"relative position bias is for {index.shape[0]} tokens (grid "
        f"{self.rel_pos_grid} + {self.num_prefix_tokens} prefix), got {num_tokens}; it "
        "needs the full, unmasked token sequence"
      )
    table = self.relative_position_bias_table.astype(jnp.float32)
    return table[index.reshape(-1)].reshape(num_tokens, num_tokens, -1).transpose(2, 0, 1)

  def __call__(self, x):
    b, n, d = x.shape
    bias = self.relative_bias(n)
    if self.fused:
      qkv = self.qkv_projection(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
      out = jax.nn.dot_product_attention(
        qkv[:, :, 0],
        qkv[:, :, 1],
        qkv[:, :, 2],
        bias=None if bias is None else bias[None].astype(qkv.dtype),
      )
      out = out.reshape(b, n, d)
    else:
      q, k, v = self.qkv_split(x, self.num_heads)
      scale = (d // self.num_heads) ** -0.5
      # Softmax in float32 whatever the compute dtype.
      logits = (jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale).astype(jnp.float32)
      if bias is not None:
        logits = logits + bias[None]
      attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      out = jnp.einsum("bhqk,bhkd->bhqd", attn, v)
      out = out.transpose(0, 2, 1, 3).reshape(b, n, d)
    return self.proj(out)


class Block(nn.Module):
  """Pre-norm Transformer block (timm 0.3.2 `Block`), optionally with BEiT's
  layer scale (`layer_scale` = init value of the learned per-channel
  `gamma_1`, `gamma_2` that scale each residual branch), its q/v biases and
  relative position bias (see `Attention`)."""

  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  fused_attention: bool = False
  # Rematerialise (jax.checkpoint) the block in the backward pass: activation
  # memory for compute. Params and their names are unchanged.
  remat: bool = False
  layer_scale: float | None = None
  qkv_bias: str = "fused"
  rel_pos_grid: tuple[int, int] | None = None
  num_prefix_tokens: int = 1

  def setup(self):
    self.norm1 = layer_norm(dtype=self.dtype)
    self.attn = Attention(
      self.num_heads,
      self.width,
      dtype=self.dtype,
      fused=self.fused_attention,
      qkv_bias=self.qkv_bias,
      rel_pos_grid=self.rel_pos_grid,
      num_prefix_tokens=self.num_prefix_tokens,
    )
    self.norm2 = layer_norm(dtype=self.dtype)
    self.mlp = Mlp(int(self.width * self.mlp_ratio), dtype=self.dtype)
    if self.layer_scale is not None:
      init = nn.initializers.constant(self.layer_scale)
      self.gamma_1 = self.param("gamma_1", init, (self.width,))
      self.gamma_2 = self.param("gamma_2", init, (self.width,))
    # Stochastic depth: one Bernoulli per sample, survivors scaled by 1/keep
    # (timm DropPath), i.e. dropout broadcast over tokens and channels.
    self.drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), rng_collection="drop_path")

  def __call__(self, x, train: bool = False):
    if self.remat:
      return nn.remat(Block._forward, static_argnums=(2,))(self, x, train)
    return self._forward(x, train)

  def _forward(self, x, train: bool):
    return self.residual_forward(x, lambda y, _: self.drop(y, deterministic=not train))

  def _scaled(self, y, branch: int):
    if self.layer_scale is None:
      return y
    return y * (self.gamma_1 if branch == 0 else self.gamma_2).astype(y.dtype)

  def residual_forward(self, x, drop: Callable):
    """The block with `drop(branch_output, branch)` (branch 0: attention,
    1: MLP) as stochastic depth. The one definition of the block's
    computation: the unrolled path passes its `nn.Dropout`, the scanned path
    (`scan_blocks`) a drop path whose rate is a traced per-block value."""
    x = x + drop(self._scaled(self.attn(self.norm1(x)), 0), 0)
    x = x + drop(self._scaled(self.mlp(self.norm2(x)), 1), 1)
    return fusion_barrier.residual_barrier(x)

  def relation_qkv(self, x, heads: int):
    """norm1 + fused qkv of this block, split into `heads` relation heads."""
    return self.attn.qkv_split(self.norm1(x), heads)

  def features(self, x):
    """Intermediate features for feature-distillation ablations (the branch
    outputs after layer scale, where there is one)."""
    attn = self._scaled(self.attn(self.norm1(x)), 0)
    x_attn = x + attn
    ffn = self._scaled(self.mlp(self.norm2(x_attn)), 1)
    q, k, v = jnp.split(self.attn.qkv_projection(self.norm1(x)), 3, axis=-1)
    return {
      "attn": attn,
      "attn_residual": x_attn,
      "ffn": ffn,
      "ffn_residual": x_attn + ffn,
      "q": q,
      "k": k,
      "v": v,
    }


DROP_PATH_SCHEDULES = ("linear", "constant", "constant_but_last")


def drop_path_rates(rate: float, depth: int, schedule: str = "linear") -> tuple[float, ...]:
  """Per-block stochastic-depth rates.

  'linear': timm's ramp `linspace(0, rate, depth)` (fine-tuning).
  'constant_but_last': TinyMIM's student, `rate` everywhere but 0 on the last
  block (whose output is never used in distillation).
  """
  if schedule == "linear":
    return tuple(float(r) for r in np.linspace(0.0, rate, depth))
  if schedule == "constant_but_last":
    return tuple([float(rate)] * (depth - 1) + [0.0])
  if schedule == "constant":
    return tuple([float(rate)] * depth)
  raise ValueError(f"unknown drop_path schedule {schedule!r}; use one of {DROP_PATH_SCHEDULES}")


def traced_drop_path(y: jax.Array, keep: jax.Array, key: jax.Array) -> jax.Array:
  """timm DropPath with a traced keep probability: one Bernoulli per sample,
  survivors scaled by 1/keep, as `Block.drop` does with a static rate."""
  mask = jax.random.bernoulli(key, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
  # keep = 0 drops every sample; dividing by 1 there instead keeps the
  # unselected branch, and so the gradient, free of inf * 0.
  safe_keep = jnp.where(keep > 0, keep, 1.0).astype(y.dtype)
  return jnp.where(mask, y / safe_keep, jnp.zeros_like(y))


STACKED = "blocks_stacked"


def stack_blocks(params: dict, count: int) -> dict:
  """`params` (host numpy, `blocks_<i>` layout) with blocks 0..count-1 moved
  into one stacked subtree `blocks_stacked`, for a frozen model run with
  `scan_blocks`: the scan then reads the stack instead of stacking the
  blocks again on every forward. Blocks from `count` on stay as they are (a
  teacher's target block is called directly)."""
  import numpy as np

  if count < 2:
    return params
  out = dict(params)
  blocks = [out.pop(f"blocks_{i}") for i in range(count)]
  out[STACKED] = jax.tree_util.tree_map(lambda *a: np.stack(a), *blocks)
  return out


def run_block_stack(
  module: nn.Module, blocks: Sequence[Block], x: jax.Array, train: bool, *, scan: bool, remat: bool
) -> jax.Array:
  """Runs `blocks` (submodules of `module`, in order) on `x`.

  With `scan`, outside of init and for two or more blocks, the blocks'
  params (`module.variables['params'][<block name>]`, the usual
  `blocks_<i>` layout) are stacked on the fly (or read from a
  `blocks_stacked` subtree made once by `stack_blocks`, for a frozen
  model) and one standalone `Block` is
  applied under `jax.lax.scan`: XLA compiles the block body once instead of
  once per block, and gradients reach each `blocks_<i>` through the stack.
  At init the plain loop runs, so the params are created in that layout.
  The price: the stack (and, in training, its gradient) is a copy of the
  blocks' params, small next to a step's activations.

  Stochastic depth in the scan draws one key with `make_rng('drop_path')`
  and folds in the block index, so its masks differ from the unrolled
  mode's (same distribution: one Bernoulli per sample and residual branch).
  In eval mode, or when every rate is 0, it is the same computation.
  `remat` checkpoints the scan body (the unrolled blocks remat themselves).
  """
  if not scan or len(blocks) < 2 or module.is_initializing():
    for blk in blocks:
      x = blk(x, train=train)
    return x
  first = blocks[0]
  static = lambda b: (
    b.width,
    b.num_heads,
    b.mlp_ratio,
    b.dtype,
    b.fused_attention,
    b.layer_scale,
    b.qkv_bias,
    b.rel_pos_grid,
    b.num_prefix_tokens,
  )
  if any(static(b) != static(first) for b in blocks):
    raise ValueError(
      "scan_blocks needs blocks that differ only in their "
      f"drop_path rate, got {[static(b) for b in blocks]}"
    )
  params = module.variables["params"]
  pre = params.get(STACKED)
  count = len(jax.tree_util.tree_leaves(pre)[0]) if pre is not None else 0
  if pre is not None and count == len(blocks) and blocks[0].name == "blocks_0":
    stacked = pre  # a frozen model stacked once when loaded (`stack_blocks`)
  else:
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[params[b.name] for b in blocks])
  # Keep probabilities rounded from float64 like `nn.Dropout`'s 1 - rate.
  keeps = jnp.asarray([1.0 - float(b.drop_path) for b in blocks], jnp.float32)
  drops = train and any(float(b.drop_path) > 0 for b in blocks)
  # Only rates > 0 in training need an rng, as in the unrolled mode.
  base_key = module.make_rng("drop_path") if drops else None
  block = Block(
    first.width,
    first.num_heads,
    first.mlp_ratio,
    dtype=first.dtype,
    fused_attention=first.fused_attention,
    layer_scale=first.layer_scale,
    qkv_bias=first.qkv_bias,
    rel_pos_grid=first.rel_pos_grid,
    num_prefix_tokens=first.num_prefix_tokens,
    parent=None,
  )

  def body(h, xs):
    p, keep, index = xs
    if drops:
      keys = jax.random.split(jax.random.fold_in(base_key, index))
      drop = lambda y, branch: traced_drop_path(y, keep, keys[branch])
    else:
      drop = lambda y, _: y
    return block.apply({"params": p}, h, drop, method=Block.residual_forward), None

  if remat:
    # prevent_cse=False: the scan already keeps XLA from merging the
    # recomputation into the forward (jax.checkpoint's documented advice).
    body = jax.checkpoint(body, prevent_cse=False)
  # The carry's dtype must not change across iterations: the first block
  # would promote x to this dtype anyway (an exact upcast).
  x = x.astype(jnp.result_type(x.dtype, first.dtype))
  x, _ = jax.lax.scan(body, x, (stacked, keeps, jnp.arange(len(blocks))))
  return x


POS_EMBED_TYPES = ("sincos", "cae_sincos", "learned", "none")
# Position embeddings held fixed (the official models' requires_grad=False).
FIXED_POS_EMBED_TYPES = ("sincos", "cae_sincos")


class ViTEncoder(nn.Module):
  """ViT encoder: patch embedding, position embedding, prefix tokens (CLS, and
  DeiT's distillation token with `dist_token`), blocks, norm.

  Token order is `[cls, dist?, patches]` (DeiT). `pos_embed_type`: 'sincos'
  (MAE's fixed 2-D embedding, in the non-trained 'fixed' collection),
  'cae_sincos' (CAE's fixed embedding, first half of the channels = the
  row, also 'fixed'), 'learned' (a param, initialised with MAE's sin-cos
  values) or 'none' (BEiT-style backbones with relative position bias only).
  Prefix rows of the embedding are zeros at init. `layer_scale`, `qkv_bias`
  and `rel_pos_bias` configure every block (see `Block`).
  """

  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  image_size: int = 224
  in_chans: int = 3
  mlp_ratio: float = 4.0
  drop_path: Sequence[float] | float = 0.0
  pos_embed_type: str = "sincos"
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  fused_attention: bool = False
  remat: bool = False  # jax.checkpoint per block (see `Block.remat`)
  # Run the blocks under one lax.scan (compile time; see `run_block_stack`).
  scan_blocks: bool = False
  dist_token: bool = False
  layer_scale: float | None = None
  qkv_bias: str = "fused"
  rel_pos_bias: bool = False

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def num_prefix_tokens(self) -> int:
    return 2 if self.dist_token else 1

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image size {self.image_size} is not divisible by patch size "
        f"{self.patch_size}; choose an image size that is a multiple of it."
      )
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.pos_embed_type not in POS_EMBED_TYPES:
      raise ValueError(
        f"unknown pos_embed_type {self.pos_embed_type!r}; use one of {POS_EMBED_TYPES}"
      )
    p = self.patch_size
    self.patch_embed = nn.Conv(
      self.width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=patch_init,
      bias_init=torch_default_bias_init(self.in_chans * p * p),
    )
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
    if self.dist_token:
      self.dist_token_param = self.param(
        "dist_token", nn.initializers.normal(0.02), (1, 1, self.width)
      )
    initial = lambda *_: jnp.asarray(self.initial_pos_embed())
    if self.pos_embed_type == "learned":
      self._pos_embed = self.param("pos_embed", initial)
    elif self.pos_embed_type in FIXED_POS_EMBED_TYPES:
      # Not a param: the official models hold it with requires_grad=False, so
      # it lives in the 'fixed' collection that no optimizer ever sees. It is
      # still a variable (not a constant) so a checkpoint's copy is used.
      self._pos_embed = self.variable("fixed", "pos_embed", initial)
    rates = self.drop_path
    if isinstance(rates, (int, float)):
      rates = drop_path_rates(float(rates), self.depth)
    if len(rates) != self.depth:
      raise ValueError(f"{len(rates)} drop-path rates for {self.depth} blocks")
    grid = (self.grid_size, self.grid_size) if self.rel_pos_bias else None
    self.blocks = [
      Block(
        self.width,
        self.num_heads,
        self.mlp_ratio,
        rates[i],
        dtype=self.dtype,
        fused_attention=self.fused_attention,
        remat=self.remat,
        layer_scale=self.layer_scale,
        qkv_bias=self.qkv_bias,
        rel_pos_grid=grid,
        num_prefix_tokens=self.num_prefix_tokens,
      )
      for i in range(self.depth)
    ]
    if self.final_norm:
      self.norm = layer_norm(dtype=self.dtype)

  # -- pieces ---------------------------------------------------------------
  def initial_pos_embed(self) -> np.ndarray:
    """`(1, prefix + L, D)`: MAE's (or with 'cae_sincos' CAE's) sin-cos rows
    for the patches, zeros for the prefix tokens."""
    table = (
      pos_embed_lib.cae_sincos_2d
      if self.pos_embed_type == "cae_sincos"
      else pos_embed_lib.sincos_2d
    )
    patches = table(self.width, self.grid_size, cls_token=False)
    prefix = np.zeros((self.num_prefix_tokens, self.width), np.float32)
    return np.concatenate([prefix, patches])[None]

  @property
  def pos_embed(self):
    if self.pos_embed_type == "none":
      return None
    pe = self._pos_embed
    return pe if self.pos_embed_type == "learned" else pe.value

  def embed_patches(self, images):
    """NHWC images -> `(B, L, D)` patch tokens with position embedding."""
    b, h, w, _ = images.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(
        f"images are {h}x{w} but the model was built for {self.image_size}x{self.image_size}"
      )
    x = self.patch_embed(images.astype(self.dtype))
    x = x.reshape(b, -1, self.width)
    if self.pos_embed is None:
      return x
    return x + self.pos_embed[:, self.num_prefix_tokens :].astype(x.dtype)

  def prepend_prefix(self, x):
    """`[cls, dist?] + x`, each prefix token plus its position-embedding row."""
    tokens = [self.cls_token]
    if self.dist_token:
      tokens.append(self.dist_token_param)
    prefix = jnp.concatenate(tokens, axis=1)
    if self.pos_embed is not None:
      prefix = prefix + self.pos_embed[:, : self.num_prefix_tokens]
    prefix = jnp.broadcast_to(
      prefix.astype(x.dtype), (x.shape[0], self.num_prefix_tokens, self.width)
    )
    return jnp.concatenate([prefix, x], axis=1)

  def run_blocks(self, x, stop: int, train: bool, start: int = 0):
    """Blocks start+1..stop on `x` (unrolled, or scanned with `scan_blocks`)."""
    return run_block_stack(
      self, self.blocks[start:stop], x, train, scan=self.scan_blocks, remat=self.remat
    )

  def _check_block(self, block: int):
    if not 1 <= block <= self.depth:
      raise ValueError(
        f"block {block} is outside 1..{self.depth} (1-based) for an encoder of depth {self.depth}"
      )

  # -- forwards ---------------------------------------------------------------
  def __call__(
    self,
    images,
    *,
    train: bool = False,
    stop_after: int | None = None,
    tokens: jax.Array | None = None,
  ):
    """Token features `(B, prefix + L, D)`.

    `stop_after=k` runs blocks 1..k only and skips the final norm unless k is
    the last block. `tokens` replaces `embed_patches(images)` (MAE passes the
    visible subset).
    """
    x = self.embed_patches(images) if tokens is None else tokens
    x = self.prepend_prefix(x)
    stop = self.depth if stop_after is None else stop_after
    self._check_block(stop)
    x = self.run_blocks(x, stop, train)
    if stop == self.depth and self.final_norm:
      x = self.norm(x)
    return x

  def block_outputs(
    self, images, indices: Sequence[int], *, train: bool = False
  ) -> list[jax.Array]:
    """The token sequences after blocks `indices` (0-based, ascending, as
    BEiT/TinyMIM's `out_indices`), without the final norm; blocks after the
    last index are never run."""
    indices = [int(i) for i in indices]
    if (
      indices != sorted(set(indices))
      or not indices
      or not 0 <= indices[0]
      or indices[-1] >= self.depth
    ):
      raise ValueError(
        f"out_indices={indices} must be ascending, distinct block "
        f"indices in 0..{self.depth - 1} (0-based)"
      )
    x = self.prepend_prefix(self.embed_patches(images))
    outputs, done = [], 0
    for index in indices:
      x = self.run_blocks(x, index + 1, train, start=done)
      done = index + 1
      outputs.append(x)
    return outputs

  def relation_qkv(
    self, images, *, block: int, heads: int, train: bool = False, tokens: jax.Array | None = None
  ):
    """q, k, v `(B, R, N, D/R)` of block `block` (1-based) with R=`heads`.

    Blocks after `block` are never run, and of `block` itself only norm1 and
    the qkv projection are used, as in TinyMIM.
    """
    self._check_block(block)
    x = self.embed_patches(images) if tokens is None else tokens
    x = self.run_blocks(self.prepend_prefix(x), block - 1, train)
    return self.blocks[block - 1].relation_qkv(x, heads)

  def block_features(self, images, *, block: int, train: bool = False):
    """Input and intermediate features of block `block` (1-based)."""
    self._check_block(block)
    x = self.run_blocks(self.prepend_prefix(self.embed_patches(images)), block - 1, train)
    feats = self.blocks[block - 1].features(x)
    feats["input"] = x
    return feats
