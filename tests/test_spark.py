"""SparK pre-training pieces: model outputs, ConvTranspose = torch's, the
loss over masked patches only, 3 steps on 8 devices == 1 device, the CNN
layer-decay rules and schedules, LAMB = timm 0.5.4's update rule (the
parity kinds run in test_parity.py on the copied fixtures)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_cnn_models import numpy_variables

from mimdistill.models import sparse
from mimdistill.models.cnn_zoo import build_cnn
from mimdistill.models.spark import ConvTranspose, SparK
from mimdistill.objectives.spark_loss import reconstruction_image, spark_loss
from mimdistill.training import cnn_layer_decay as lrd
from mimdistill.training.optimizer import path_names
from mimdistill.training.spark_schedules import spark_lr, spark_weight_decay

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(KEY, (8, 64, 64, 3))
ACTIVE = sparse.random_active(jax.random.PRNGKey(1), 8, 2, 0.5)
ENCODER = dict(family="resnet", block="basic", layers=(1, 1, 1, 1), div=16)
# Compiling a SparK step costs tens of seconds on a loaded 2-core host; the
# unoptimised CPU backend halves that and the programs stay tiny.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


@pytest.fixture(scope="module")
def spark():
  model = SparK(build_cnn(ENCODER), decoder_width=32, densify_norm="bn")
  return model, numpy_variables(model, IMAGES[:1], ACTIVE[:1])


def test_outputs_and_loss_over_masked_patches_only(spark):
  model, variables = spark
  run = lambda v: model.apply(v, IMAGES, ACTIVE, train=True, mutable=["batch_stats"])
  out, _ = jax.jit(run, compiler_options=FAST_COMPILE)(variables)
  assert [f.shape[1] for f in out.features] == [16, 8, 4, 2]
  assert [x.shape[-1] for x in out.to_dec] == [32, 16, 8, 4]
  assert [b.shape[1:] for b in out.decoder_blocks][-1] == (64, 64, 1)
  assert out.rec.shape == (8, 64, 64, 3)
  loss = spark_loss(out.rec, IMAGES, ACTIVE)
  assert loss.patch_l2.shape == (8, 4) and np.isfinite(float(loss.loss))
  # Changing the reconstruction of visible patches changes nothing.
  visible = sparse.mask_at(ACTIVE, 64, 64, bool)
  other = jnp.where(visible, 100.0, out.rec)
  np.testing.assert_allclose(spark_loss(other, IMAGES, ACTIVE).loss, loss.loss, rtol=1e-6)
  masked = 1 - ACTIVE.reshape(8, -1)
  np.testing.assert_allclose(loss.loss, (loss.patch_l2 * masked).sum() / masked.sum(), rtol=1e-6)
  # The picture shows the input where visible.
  picture = reconstruction_image(out.rec, IMAGES, ACTIVE)
  np.testing.assert_array_equal(np.asarray(picture)[np.asarray(visible[..., 0])], np.asarray(
    IMAGES
  )[np.asarray(visible[..., 0])])  # fmt: skip


def test_conv_transpose_is_torch_conv_transpose2d():
  """Against the definition: out[o, s*y + k - p] += x[i, y] * w[i, o, k]."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 3, 3, 2)).astype(np.float32)
  w = rng.standard_normal((2, 5, 4, 4)).astype(np.float32)  # torch (in, out, kh, kw)
  full = np.zeros((1, (3 - 1) * 2 + 4, (3 - 1) * 2 + 4, 5))
  for yi in range(3):
    for xi in range(3):
      full[0, 2 * yi : 2 * yi + 4, 2 * xi : 2 * xi + 4] += np.einsum("i,iokl->klo", x[0, yi, xi], w)
  ref = full[:, 1:-1, 1:-1]  # padding 1 crops one row/column each side: 2H out
  layer = ConvTranspose(5)
  params = {"params": {"kernel": w.transpose(2, 3, 0, 1), "bias": np.zeros(5, np.float32)}}
  np.testing.assert_allclose(layer.apply(params, x), ref, atol=1e-5)


def test_three_steps_on_eight_devices_equal_one_device(spark):
  """Params and BN statistics after 3 SGD steps: SyncBN by construction."""
  if len(jax.devices()) < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  model, variables = spark
  tx = optax.sgd(0.1)

  @partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(state, images, active):
    params, stats, opt = state

    def loss_fn(p):
      out, new = model.apply(
        {"params": p, "batch_stats": stats}, images, active, train=True, mutable=["batch_stats"]
      )
      return spark_loss(out.rec, images, active).loss, new["batch_stats"]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), stats, opt

  def run(place):
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    for _ in range(3):
      state = step(state, place(IMAGES), place(ACTIVE))
    return jax.device_get(state[:2])

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  one = run(lambda a: a)
  eight = run(lambda a: jax.device_put(a, data))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), one, eight)


def test_spark_errors():
  with pytest.raises(ValueError, match="densify_norm must be one of"):
    SparK(build_cnn(ENCODER), 32, densify_norm="gn").init(KEY, IMAGES[:1], ACTIVE[:1])
  with pytest.raises(ValueError, match="decoder width 16 is too small"):
    jax.eval_shape(SparK(build_cnn(ENCODER), 16).init, KEY, IMAGES[:1], ACTIVE[:1])
  with pytest.raises(ValueError, match="image size 80 is not a multiple of 32"):
    jax.eval_shape(SparK(build_cnn(ENCODER), 32).init, KEY, jnp.zeros((1, 80, 80, 3)), ACTIVE[:1])


def _resnet_params(depth):
  shapes = jax.eval_shape(
    build_cnn({"family": "resnet", "depth": depth, "num_classes": 10}).init,
    KEY,
    jnp.zeros((1, 32, 32, 3)),
  )
  return shapes["params"]


def test_resnet_layer_decay_rules():
  r18, r34, r50 = (_resnet_params(d) for d in (18, 34, 50))
  with pytest.raises(
    ValueError, match=r"SparK's ResNet layer-decay rule has no grouping .*\(2, 2\)"
  ):
    lrd.layer_ids(r18, rule="spark")
  ids18 = lrd.layer_ids(r18)
  assert ids18["conv1"]["kernel"] == (0, 7)
  assert ids18["layer1_1"]["conv1"]["kernel"] == (1, 6)
  assert [ids18[f"layer2_{b}"]["conv1"]["kernel"][0] for b in (0, 1)] == [2, 3]
  assert [ids18[f"layer3_{b}"]["conv1"]["kernel"][0] for b in (0, 1)] == [4, 5]
  assert ids18["layer4_1"]["conv2"]["kernel"] == (6, 1)
  assert ids18["fc"]["bias"] == (7, 0)
  # ResNet-34 has ResNet-50's stage lengths: SparK's own table applies.
  flat = lambda t: jax.tree_util.tree_leaves(t, is_leaf=lambda x: isinstance(x, tuple))
  assert sorted(set(flat(lrd.layer_ids(r34, rule="spark")))) == sorted(
    set(flat(lrd.layer_ids(r50, rule="spark")))
  )
  scales = lrd.lr_scales(r50, 0.7)
  assert scales["conv1"]["kernel"] == pytest.approx(0.7**7)
  assert lrd.lr_scales(r50, 1.0)["conv1"]["kernel"] == 1.0
  wd = lrd.weight_decay_scales(r50)
  assert wd["conv1"]["kernel"] == 1.0 and wd["bn1"]["scale"] == 0.0 and wd["fc"]["bias"] == 0.0


def test_spark_schedules():
  lr = spark_lr(1.0, warmup_steps=4, total_steps=20)
  np.testing.assert_allclose(lr(np.arange(5)), [0.005, 0.25375, 0.5025, 0.75125, 1.0], rtol=1e-6)
  np.testing.assert_allclose(lr(19), 0.001, rtol=1e-5)
  wd = spark_weight_decay(0.04, 0.2, total_steps=11)
  np.testing.assert_allclose([wd(0), wd(10)], [0.04, 0.2], rtol=1e-6)
  np.testing.assert_allclose(spark_weight_decay(0.05, None, 11)(np.arange(3)), [0.05] * 3)
  with pytest.raises(ValueError, match="leaves no cosine phase"):
    spark_lr(1.0, warmup_steps=10, total_steps=10)


def test_spark_checkpoint_import_and_export(spark, tmp_path):
  """SparK's pre-training layout ({'module': weights + a 'config' dict})
  written torch-free, read back whole or encoder only, and the encoder's
  export in timm names."""
  import collections

  from pth_writer import tensor, write_pth

  from mimdistill.interop import cnn_names
  from mimdistill.interop.cnn_checkpoint import export_cnn, import_cnn
  from mimdistill.parity.kinds.spark import spark_config_entry

  _, variables = spark
  state = cnn_names.to_torch(variables, "spark", num_batches_tracked=3)
  assert "sparse_encoder.sp_cnn.layer1.0.bn1.num_batches_tracked" in state
  assert state["mask_tokens.0"].shape == (1, 32, 1, 1)
  assert state["dense_decoder.dec.0.up_sample.weight"].shape[:2] == (32, 32)
  module = collections.OrderedDict((n, tensor(v)) for n, v in state.items())
  module["config"] = {"densify_norm_str": "bn", "dense_decoder.width": 32}
  path = write_pth(tmp_path / "spark_style.pth", {"module": module, "epoch": 0})

  assert spark_config_entry(path) == {"densify_norm_str": "bn", "dense_decoder.width": 32}
  whole = import_cnn(path, part="spark")
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(variables), whole.variables)
  enc = import_cnn(path)
  assert enc.source == "spark" and enc.fields["layers"] == (1, 1, 1, 1) and enc.fields["div"] == 16
  assert any(n.startswith("dense_decoder.") for n in enc.report.skipped)
  sub = {c: variables[c]["encoder"] for c in ("params", "batch_stats")}
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(sub), enc.variables)
  timm = export_cnn(enc.variables, "resnet")
  assert set(timm) == {n[len("sparse_encoder.sp_cnn.") :] for n in state if "sp_cnn." in n}


def test_scale_by_tree_applies_layer_scales():
  params = _resnet_params(18)
  params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape), params)
  scales = lrd.lr_scales(params, 0.5)
  tx = lrd.scale_by_tree(scales)
  updates, _ = tx.update(params, tx.init(params))
  assert float(updates["conv1"]["kernel"].max()) == 0.5**7
  assert float(updates["fc"]["bias"].max()) == 1.0


def _timm_lamb_reference(params, grads_seq, lr, *, b1, b2, eps, wd, wd_scales, bias_correction,
                         always_adapt, lr_scales):  # fmt: skip
  """timm 0.5.4 `Lamb.step` (max_grad_norm off) transcribed in numpy."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    bc1 = 1 - b1**t if bias_correction else 1.0
    bc2 = 1 - b2**t if bias_correction else 1.0
    for k in p:
      g = grads[k].astype(np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      update = (m[k] / bc1) / (np.sqrt(v[k]) / np.sqrt(bc2) + eps)
      decay = wd(t - 1) * wd_scales[k]
      if decay != 0:
        update = update + decay * p[k]
      if decay != 0 or always_adapt:
        w_norm, u_norm = np.linalg.norm(p[k]), np.linalg.norm(update)
        update = update * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0)
      p[k] = p[k] - lr(t - 1) * lr_scales[k] * update
  return p


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_lamb_is_timm_lamb(recipe):
  """3 steps of `cnn_optimizer` (LAMB with SparK's param groups) against timm
  0.5.4's update rule: pre-training (bias correction, adaptation only where
  weight decay applies, annealed wd) and fine-tuning (no bias correction,
  always adapting, layer-wise lr scales)."""
  import ml_collections

  from mimdistill.training import cnn_optimizer

  rng = np.random.default_rng(0)
  params = {
    "conv1": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
    "bn1": {"scale": rng.uniform(0.5, 1.5, (4,)).astype(np.float32)},
    "fc": {
      "kernel": rng.standard_normal((4, 3)).astype(np.float32),
      "bias": np.zeros(3, np.float32),
    },
    "layer1_0": {"conv1": {"kernel": rng.standard_normal((3, 3, 4, 4)).astype(np.float32)}},
    "layer2_0": {"conv1": {"kernel": rng.standard_normal((1, 1, 4, 4)).astype(np.float32)}},
    "layer3_0": {"conv1": {"kernel": rng.standard_normal((1, 1, 4, 4)).astype(np.float32)}},
    "layer4_0": {"conv1": {"kernel": rng.standard_normal((1, 1, 4, 4)).astype(np.float32)}},
  }
  grads = [jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
           for _ in range(3)]  # fmt: skip
  pre = recipe == "pretrain"
  section = ml_collections.ConfigDict(
    dict(name="lamb", b1=0.9, b2=0.95 if pre else 0.999, eps=1e-6, bias_correction=pre,
         always_adapt=not pre, layer_decay_rule="extended", clip_grad_norm=0.0,
         accumulate_steps=1)
  )  # fmt: skip
  lr = spark_lr(0.1, warmup_steps=1, total_steps=5)
  wd = spark_weight_decay(0.04, 0.2 if pre else None, total_steps=5)
  decay = 1.0 if pre else 0.7
  tx = cnn_optimizer.from_config(params, lr, section, weight_decay=wd, layer_decay=decay)

  @jax.jit
  def run(params):
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params

  got = run(params)
  flat = lambda tree: dict(zip(jax.tree_util.tree_leaves(path_names(tree)),
                               jax.tree_util.tree_leaves(tree)))  # fmt: skip
  lr_scales = flat(lrd.lr_scales(params, decay)) if not pre else None
  want = _timm_lamb_reference(
    flat(params),
    [flat(g) for g in grads],
    lambda t: float(lr(t)),
    b1=section.b1,
    b2=section.b2,
    eps=1e-6,
    wd=lambda t: float(wd(t)),
    wd_scales=flat(lrd.weight_decay_scales(params)),
    bias_correction=pre,
    always_adapt=not pre,
    lr_scales=lr_scales or {k: 1.0 for k in flat(params)},
  )
  for name, value in flat(got).items():
    np.testing.assert_allclose(value, want[name], rtol=2e-5, atol=1e-6, err_msg=name)
