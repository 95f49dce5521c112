"""`scan_blocks`: the blocks under one lax.scan, params kept as `blocks_<i>`.

  * the params tree (names, shapes) is the unrolled model's;
  * eval-mode forwards (full, truncated, relation qkv, block features, the
    distillation student, MAE loss, classifier) and train-mode gradients
    without drop path match the unrolled model;
  * drop path in the scan: deterministic for a fixed rng, one keep/drop
    decision per sample and residual branch with survivors scaled by
    1/keep, rate 0 is the eval computation, rate 1 makes every block the
    identity, remat changes no value;
  * the jaxpr holds one scan with the block body once;
  * the stages and the benchmark sweeps pass `scan_blocks` through.
No timing assertions (the compile-time gain is measured separately).

Variables are passed to the jitted functions as arguments, never closed
over: XLA would constant-fold closed-over weights, which moves float32
results by an ulp or so between two otherwise identical programs.
"""

import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import REPO

from mimdistill.models import factory
from mimdistill.models.vit import Block, ViTEncoder, traced_drop_path
from mimdistill.objectives.mae_loss import mae_loss
from mimdistill.stages import distill, finetune, pretrain
from mimdistill.training import benchmark

sys.path.insert(0, str(REPO))
from configs import finetune as finetune_config  # noqa: E402
from configs import mae_pretrain, tinymim_distill  # noqa: E402

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(KEY, (2, 32, 32, 3))
NOISE = jax.random.uniform(jax.random.PRNGKey(1), (2, 16))
ENC = dict(width=32, depth=3, num_heads=4, patch_size=8, image_size=32)
SECTION = dict(ENC, variant="custom", decoder=dict(width=32, depth=2, num_heads=4))
EXTRA = {"encoder": {}, "mae": {}, "classifier": {"num_classes": 5}}


def _pair(kind):
  """The model of `kind` (factory) unrolled and scanned."""
  return tuple(
    factory.build(kind, dict(SECTION, scan_blocks=scan), **EXTRA[kind]) for scan in (False, True)
  )


@functools.cache
def _mae_vars():
  return jax.jit(lambda k: _pair("mae")[0].init(k, IMAGES, NOISE, 0.75))(KEY)


@functools.cache
def _encoder_vars():
  """The MAE's encoder: a `ViTEncoder(**ENC)`'s variables (one jitted init
  per test file is enough; each costs seconds on a CPU)."""
  return {c: v["encoder"] for c, v in _mae_vars().items()}


def _close(a, b, tol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=tol, atol=tol)


def _rel_close(a, b, rtol):
  """Each leaf within `rtol` of the leaf's largest magnitude."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() <= rtol * max(np.abs(x).max(), 1e-12)


def _mae_loss(model, variables, train=False):
  out = model.apply(variables, IMAGES, NOISE, 0.75, train=train)
  return mae_loss(out.pred, IMAGES, out.masking.mask, 8, True)


# -----------------------------------------------------------------------------
# Same params, same numerics without drop path
# -----------------------------------------------------------------------------
def test_params_layout_is_unchanged():
  for kind, args in (
    ("encoder", (IMAGES,)),
    ("mae", (IMAGES, NOISE, 0.75)),
    ("classifier", (IMAGES,)),
  ):
    plain, scanned = _pair(kind)
    a = jax.eval_shape(lambda: plain.init(KEY, *args))  # noqa: B023
    b = jax.eval_shape(lambda: scanned.init(KEY, *args))  # noqa: B023
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert jax.tree_util.tree_map(lambda x: x.shape, a) == jax.tree_util.tree_map(
      lambda x: x.shape, b
    )
  assert {"blocks_0", "blocks_2"} <= set(a["params"]["encoder"])


def test_eval_forwards_match_unrolled():
  def encoder_outputs(m, v):
    return (
      m.apply(v, IMAGES),
      m.apply(v, IMAGES, stop_after=2),
      m.apply(v, IMAGES, block=3, heads=2, method=ViTEncoder.relation_qkv),
      m.apply(v, IMAGES, block=3, method=ViTEncoder.block_features),
    )

  outs = [jax.jit(functools.partial(encoder_outputs, m))(_encoder_vars()) for m in _pair("encoder")]
  _close(*outs)

  # The classifier from the MAE encoder (learned pos_embed, no final norm).
  plain, scanned = _pair("classifier")
  enc = _encoder_vars()
  cv = {
    "params": {
      "encoder": {
        **{k: v for k, v in enc["params"].items() if k != "norm"},
        "pos_embed": enc["fixed"]["pos_embed"],
      },
      "fc_norm": {"scale": jnp.ones(32), "bias": jnp.zeros(32)},
      "head": {"kernel": jax.random.normal(KEY, (32, 5)), "bias": jnp.zeros(5)},
    }
  }
  assert jax.tree_util.tree_structure(cv) == jax.tree_util.tree_structure(
    jax.eval_shape(plain.init, KEY, IMAGES)
  )
  _close(jax.jit(plain.apply)(cv, IMAGES), jax.jit(scanned.apply)(cv, IMAGES))


def test_distill_student_forward_matches_unrolled():
  """The student's blocks run from its `DistillStudent` parent."""
  c = tinymim_distill.get_config("quickstart")
  c.teacher.update(width=32, depth=3, num_heads=2, patch_size=8)
  c.student.update(width=32, depth=3, num_heads=2, patch_size=8)
  student = distill.build_student(c)
  scanned = distill.build_student(_with(c, "student.scan_blocks", True))
  assert scanned.encoder.scan_blocks and not student.encoder.scan_blocks
  v = {c: {"encoder": x} for c, x in _encoder_vars().items()}
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
    jax.eval_shape(
      functools.partial(student.init, method=distill.DistillStudent.init_all), KEY, IMAGES
    )
  )
  outs = [
    jax.jit(lambda v, m=m: m.apply(v, IMAGES, relation_heads=2))(v) for m in (student, scanned)
  ]
  _close(*outs)


def test_mae_eval_loss_and_train_gradients_match_unrolled_without_drop_path():
  variables = _mae_vars()

  @functools.partial(jax.jit, static_argnums=0)
  def eval_loss_and_grads(model, variables):
    loss = lambda p: _mae_loss(model, {**variables, "params": p}, train=True)
    return (_mae_loss(model, variables), jax.value_and_grad(loss)(variables["params"]))

  (ev, (loss, grads)), (ev_s, (loss_s, grads_s)) = [
    eval_loss_and_grads(m, variables) for m in _pair("mae")
  ]
  np.testing.assert_allclose(ev_s, ev, rtol=1e-6)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  _rel_close(grads, grads_s, 1e-5)
  # Every scanned block, encoder and decoder, receives a gradient.
  for part, depth in (("encoder", 3), ("decoder", 2)):
    for i in range(depth):
      assert all(
        np.abs(np.asarray(x)).max() > 0
        for x in jax.tree_util.tree_leaves(grads_s[part][f"blocks_{i}"])
      )


# -----------------------------------------------------------------------------
# Drop path in the scan
# -----------------------------------------------------------------------------
def test_drop_path_helper_is_per_sample_and_rescaled():
  y = jnp.ones((4000, 3, 2))
  keep = np.float32(0.8)
  per_sample = np.asarray(traced_drop_path(y, keep, jax.random.PRNGKey(3))).reshape(4000, -1)
  # One decision per sample: all of its tokens and channels alike.
  assert (per_sample == per_sample[:, :1]).all()
  assert set(np.unique(per_sample)) == {0.0, np.float32(1.0) / keep}
  assert abs((per_sample[:, 0] > 0).mean() - keep) < 0.03
  np.testing.assert_array_equal(traced_drop_path(y, jnp.float32(1.0), KEY), y)
  np.testing.assert_array_equal(traced_drop_path(y, jnp.float32(0.0), KEY), 0 * y)
  # keep = 0 also keeps the gradient finite (zero).
  g = jax.grad(lambda y: traced_drop_path(y, jnp.float32(0.0), KEY).sum())(y)
  np.testing.assert_array_equal(g, 0 * y)


@functools.cache
def _scan_runner(rate, *, remat=False, depth=3, batch=2):
  """A scan-mode encoder (drop path `rate` on every block, no final norm),
  its images, and a jitted `(params, key) -> ((sum of squares, output),
  grads)` in training mode. The params are `_encoder_vars()` (a depth-2
  encoder ignores blocks_2)."""
  images = IMAGES if batch == 2 else jax.random.normal(jax.random.PRNGKey(5), (batch, 32, 32, 3))
  model = ViTEncoder(
    **dict(ENC, depth=depth),
    final_norm=False,
    drop_path=(rate,) * depth,
    scan_blocks=True,
    remat=remat,
  )

  def loss(params, key):
    out = model.apply(
      {**_encoder_vars(), "params": params}, images, train=True, rngs={"drop_path": key}
    )
    return (out**2).sum(), out

  return model, images, jax.jit(jax.value_and_grad(loss, has_aux=True))


def _tokens(model, images, v):
  """The blocks' input: patch tokens with CLS."""
  return model.apply(
    v, model.apply(v, images, method=ViTEncoder.embed_patches), method=ViTEncoder.prepend_prefix
  )


def test_scanned_drop_path_determinism_and_extremes():
  v = _encoder_vars()
  params, key1, key2 = v["params"], jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  model, images, run = _scan_runner(0.3)
  out = run(params, key1)[0][1]
  np.testing.assert_array_equal(run(params, key1)[0][1], out)  # fixed rng
  assert not np.allclose(run(params, key2)[0][1], out)
  eval_out = jax.jit(lambda v: model.apply(v, images, train=False))(v)
  assert not np.allclose(out, eval_out)
  # Rate 0: the eval computation (and no rng is needed).
  model0 = _scan_runner(0.0)[0]
  _close(eval_out, jax.jit(lambda v: model0.apply(v, images, train=True))(v))
  # Rate 1: every residual branch dropped, each block is the identity.
  model1 = _scan_runner(1.0)[0]
  one = jax.jit(lambda v, k: model1.apply(v, images, train=True, rngs={"drop_path": k}))(v, key1)
  np.testing.assert_array_equal(one, jax.jit(functools.partial(_tokens, model, images))(v))


def test_scanned_drop_path_keeps_or_drops_each_branch_per_sample():
  """Each sample's output is one of the 2^(2*depth) keep/drop combinations
  of the residual branches, survivors scaled by 1/keep."""
  depth, rate = 2, 0.5
  v = _encoder_vars()
  model, images, run = _scan_runner(rate, depth=depth, batch=6)
  out = np.asarray(run(v["params"], jax.random.PRNGKey(1))[0][1])
  block = Block(32, 4)

  @jax.jit
  def combination(v, scales):
    x = _tokens(model, images, v)
    for i in range(depth):
      x = block.apply(
        {"params": v["params"][f"blocks_{i}"]},
        x,
        lambda y, branch: y * scales[2 * i + branch],  # noqa: B023
        method=Block.residual_forward,
      )
    return x

  combos = itertools.product((0.0, 1.0 / (1 - rate)), repeat=2 * depth)
  candidates = np.stack([combination(v, jnp.asarray(c)) for c in combos])
  err = np.abs(candidates - out[None]).max(axis=(2, 3))
  assert (err.min(axis=0) < 1e-5).all(), err.min(axis=0)
  # The samples do not share one mask.
  assert len(set(err.argmin(axis=0).tolist())) > 1


def test_remat_with_scan_gives_the_same_values():
  params, key = _encoder_vars()["params"], jax.random.PRNGKey(1)
  (loss, out), grads = _scan_runner(0.3)[2](params, key)
  (loss_r, out_r), grads_r = _scan_runner(0.3, remat=True)[2](params, key)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  _close(out, out_r)
  _rel_close(grads, grads_r, 1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


# -----------------------------------------------------------------------------
# It is a scan
# -----------------------------------------------------------------------------
def test_scan_has_the_block_body_once():
  text = [
    str(jax.make_jaxpr(lambda v, m=m: m.apply(v, IMAGES))(_encoder_vars()))
    for m in _pair("encoder")
  ]
  plain, scanned = text
  assert "scan[" in scanned and "scan[" not in plain
  # 6 matmuls per block (qkv, q.k, attn.v, proj, fc1, fc2) x 3 vs once.
  dots_plain, dots_scan = plain.count("dot_general["), scanned.count("dot_general[")
  assert dots_plain >= 18 and dots_scan <= dots_plain // 2, (dots_plain, dots_scan)


# -----------------------------------------------------------------------------
# Stages and benchmark sweeps
# -----------------------------------------------------------------------------
def _with(config, key, value):
  ((_, out),) = benchmark.variants(config, [f"{key}={str(value).lower()}"])
  return out


def test_configs_and_sweeps_pass_scan_blocks_to_the_models():
  c = tinymim_distill.get_config("quickstart")
  assert not c.student.scan_blocks and not c.teacher.scan_blocks
  (_, off), (name, on) = benchmark.variants(
    c, ["student.scan_blocks+teacher.scan_blocks=false,true"]
  )
  assert name == "student.scan_blocks+teacher.scan_blocks=true"
  for cfg in (on, off):
    cfg.teacher.update(width=32, depth=3, num_heads=2, patch_size=8)
  assert distill.build_student(on).encoder.scan_blocks
  assert distill.build_teacher(on).scan_blocks
  assert not distill.build_student(off).encoder.scan_blocks
  assert not distill.build_teacher(off).scan_blocks
  pre = _with(mae_pretrain.get_config("quickstart"), "model.scan_blocks", True)
  assert pretrain.build_model(pre).encoder.scan_blocks
  fine = _with(finetune_config.get_config("quickstart"), "model.scan_blocks", True)
  assert finetune.build_model(fine, 10).encoder.scan_blocks
