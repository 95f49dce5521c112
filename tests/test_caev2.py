"""CAE v2: model, names, objective, teachers, errors, sharding (tiny sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mimdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimdistill.interop.cae_names import cae_to_flax, flax_to_cae
from mimdistill.models import factory
from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models.cae import (
  NO_GRAD_PARAMS,
  fixed_variables,
  init_variables,
  mask_indices,
)
from mimdistill.models.clip import CLIP_MEAN, CLIP_STD, ClipVisual
from mimdistill.models.vit import ViTEncoder
from mimdistill.objectives.cae_loss import (
  cae_v2_terms,
  clip_teacher,
  make_loss_fn,
  renormalize,
  vit_teacher,
)
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import schedules

jax.config.update("jax_default_matmul_precision", "highest")

NUM_MASKED = 5  # of 16 patches (32 px, patch 8)
STUDENT = dict(
  variant="custom",
  width=32,
  depth=1,
  num_heads=2,
  patch_size=8,
  image_size=32,
  layer_scale=0.1,
  qkv_bias="qv",
  regressor=dict(width=16, depth=1, num_heads=2, layer_scale=0.1),
)


def build_student(**overrides):
  """The CAE v2 student through the model factory (teacher width 8)."""
  return factory.build("cae_v2", {**STUDENT, **overrides}, out_dim=8)


def _mask(batch: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, 16), bool)
  for row in mask:
    row[rng.choice(16, NUM_MASKED, replace=False)] = True
  return mask.reshape(batch, 4, 4)


@pytest.fixture(scope="module")
def setup():
  student = build_student()
  variables = init_variables(student, jax.random.PRNGKey(0))
  tower = ClipVisual(64, 1, 1, 8, 32, 8)
  # Random teacher weights without compiling the tower's init.
  shapes = jax.eval_shape(tower.init, jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(1)
  teacher = jax.tree_util.tree_map(
    lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape).astype(np.float32)), shapes
  )
  images = jax.random.normal(jax.random.PRNGKey(2), (8, 32, 32, 3))
  batch = {"images": images, "mask": jnp.asarray(_mask(8))}
  return student, variables, tower, teacher, batch


@pytest.fixture(scope="module")
def grad_fn(setup):
  """One compiled `(params, batch, teacher) -> ((loss, metrics), (d params,
  d teacher))` shared by the tests (compiles dominate their time)."""
  student, _, tower, _, _ = setup
  loss_fn = make_loss_fn(student, clip_teacher(tower), num_masked=NUM_MASKED)
  return jax.jit(
    jax.value_and_grad(lambda p, b, t: loss_fn(p, b, None, t), argnums=(0, 2), has_aux=True)
  )


def test_cae_sincos_is_mae_with_halves_swapped():
  """CAE's first half encodes the row, MAE's the column."""
  cae = pos_embed_lib.cae_sincos_2d(16, 4)
  mae = pos_embed_lib.sincos_2d(16, 4)
  np.testing.assert_array_equal(cae[0], 0)
  np.testing.assert_allclose(cae[1:], np.concatenate([mae[1:, 8:], mae[1:, :8]], 1), atol=1e-6)
  enc = ViTEncoder(16, 1, 2, 8, 32, pos_embed_type="cae_sincos")
  v = jax.eval_shape(enc.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert "pos_embed" in v["fixed"] and "pos_embed" not in v["params"]
  np.testing.assert_array_equal(enc.initial_pos_embed()[0], cae)


def test_mask_indices_raster_order_and_errors():
  mask = jnp.asarray([[False, True, False, True], [True, False, False, True]])
  visible, masked = mask_indices(mask, 2)
  np.testing.assert_array_equal(visible, [[0, 2], [1, 2]])
  np.testing.assert_array_equal(masked, [[1, 3], [0, 3]])
  for bad in (0, 4, 5):
    with pytest.raises(ValueError, match="num_masked"):
      mask_indices(mask, bad)


def test_init_like_official(setup):
  student, variables, *_ = setup
  p = variables["params"]
  assert np.all(np.asarray(p["encoder"]["patch_embed"]["bias"]) == 0)
  for leaf in (p["encoder"]["patch_embed"]["kernel"], p["encoder"]["cls_token"], p["mask_token"]):
    assert 0 < np.abs(np.asarray(leaf)).max() <= 0.02  # trunc_normal(std, a=-std, b=std)
  np.testing.assert_array_equal(p["encoder"]["blocks_0"]["gamma_1"], np.float32(0.1))
  np.testing.assert_array_equal(
    p["regresser"]["regressor_blocks_0"]["gamma_2_cross"], np.float32(0.1)
  )
  assert "q_bias" in p["regresser"]["regressor_blocks_0"]["cross_attn"]
  assert "norm" in p["regresser"]  # the official, unused regresser.norm
  fixed = jax.tree_util.tree_map(np.asarray, fixed_variables(student))
  same = jax.tree_util.tree_map(np.array_equal, fixed, jax.device_get(variables["fixed"]))
  assert jax.tree_util.tree_all(same)


def test_names_round_trip(setup):
  _, variables, *_ = setup
  official = flax_to_cae(jax.device_get(variables))
  for name in (
    "encoder.patch_embed.proj.weight",
    "encoder.blocks.0.gamma_1",
    "encoder.blocks.0.attn.qkv.weight",
    "encoder.pos_embed",
    "encoder_to_regresser_norm.weight",
    "rd_pos_embed",
    "mask_token",
    "regresser.regressor_blocks.0.cross_attn.q_bias",
    "regresser.regressor_blocks.0.mlp_cross.fc2.weight",
    "regresser.norm.bias",
    "decoder.head.weight",
  ):
    assert name in official, name
  assert official["decoder.head.weight"].shape == (8, 16)  # torch (out, in)
  back, report = cae_to_flax({**official, "alignment_encoder.cls_token": np.zeros((1, 1, 32))})
  assert list(report.skipped) == ["alignment_encoder.cls_token"]
  same = jax.tree_util.tree_map(np.array_equal, back, jax.device_get(variables))
  assert jax.tree_util.tree_all(same)


def test_loss_terms_and_metrics(setup, grad_fn):
  _, variables, _, teacher, batch = setup
  (loss, metrics), _ = grad_fn(variables["params"], batch, teacher)
  n_vis = 16 - NUM_MASKED
  combined = metrics["loss_cls"] + n_vis * metrics["loss_visible"]
  combined = combined + NUM_MASKED * metrics["loss_masked"]
  np.testing.assert_allclose(loss, combined / 17, rtol=1e-6)
  assert 0 < float(loss) < 2


def test_renormalize_to_the_teacher():
  """The teacher's copy of the crop: (x * std + mean - clip_mean) / clip_std."""
  pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.float32) / 255
  student = (pixels - IMAGENET_MEAN) / IMAGENET_STD
  clip = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
  got = renormalize(jnp.asarray(student), (IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD))
  np.testing.assert_allclose(got, clip, atol=1e-5)


def test_teacher_gets_no_gradient_and_unused_params_none(setup, grad_fn):
  _, variables, _, teacher, batch = setup
  _, (g_student, g_teacher) = grad_fn(variables["params"], batch, teacher)
  assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g_teacher))
  norm = g_student["regresser"]["norm"]
  assert not np.any(np.asarray(norm["scale"])) and not np.any(np.asarray(norm["bias"]))
  assert np.any(np.asarray(g_student["mask_token"]))


def test_any_vit_teacher(setup):
  """An MAE / TinyMIM-style encoder as teacher: tokens after its final norm,
  its width = the student's out_dim, the student's normalisation."""
  student, variables, *_, batch = setup
  encoder = ViTEncoder(8, 1, 2, 8, 32)
  teacher = jax.eval_shape(encoder.init, jax.random.PRNGKey(4), jnp.zeros((1, 32, 32, 3)))
  loss_fn = make_loss_fn(
    student,
    vit_teacher(encoder),
    num_masked=NUM_MASKED,
    teacher_norm=(IMAGENET_MEAN, IMAGENET_STD),
  )
  loss, metrics = jax.eval_shape(loss_fn, variables["params"], batch, None, teacher)
  assert loss.shape == () and set(metrics) == {"loss", "loss_cls", "loss_visible", "loss_masked"}


def test_teacher_grid_and_width_errors(setup):
  student, variables, _, _, batch = setup
  coarse = ClipVisual(64, 1, 1, 16, 32, 8)  # 2x2 patches vs the student's 4x4
  t = jax.eval_shape(coarse.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="same grid"):
    jax.eval_shape(
      make_loss_fn(student, clip_teacher(coarse), num_masked=NUM_MASKED),
      variables["params"],
      batch,
      None,
      t,
    )
  wide = ClipVisual(64, 1, 1, 8, 32, 12)
  t = jax.eval_shape(wide.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="out_dim"):
    jax.eval_shape(
      make_loss_fn(student, clip_teacher(wide), num_masked=NUM_MASKED),
      variables["params"],
      batch,
      None,
      t,
    )


def test_regressor_options():
  """Layer scale 0: frozen unit gammas; heads need not divide the width
  (q / k / v project to heads * (width // heads) like the official code)."""
  model = build_student(
    regressor=dict(width=16, depth=1, num_heads=12, layer_scale=0.0), layer_scale=0
  )
  vis, msk = mask_indices(jnp.asarray(_mask(2)), NUM_MASKED)
  images = jnp.zeros((2, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, vis, msk)
  block = shapes["params"]["regresser"]["regressor_blocks_0"]
  assert "gamma_1_cross" not in block and "gamma_1" not in shapes["params"]["encoder"]["blocks_0"]
  assert shapes["fixed"]["regresser"]["regressor_blocks_0"]["gamma_1_cross"].shape == (16,)
  assert block["cross_attn"]["q"]["kernel"].shape == (16, 12)
  fixed = fixed_variables(model)
  np.testing.assert_array_equal(fixed["regresser"]["regressor_blocks_0"]["gamma_2_cross"], 1)
  v = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  back, _ = cae_to_flax(flax_to_cae(v), fixed_gammas=True)
  assert jax.tree_util.tree_map(np.shape, back) == jax.tree_util.tree_map(np.shape, v)
  out = jax.eval_shape(model.apply, v, images, vis, msk)
  assert out.outputs.shape == (2, 17, 8)


def _train(variables, teacher, batch, grad_fn, steps, mesh=None):
  """`steps` AdamW steps (BEiT cosine table, clipping, frozen unused params)."""
  params = variables["params"]
  table = schedules.beit_cosine_values(1e-3, 1e-5, 2, 4, 1)
  tx = opt_lib.adamw(
    params, schedules.from_values(table), clip_grad_norm=3.0, frozen=NO_GRAD_PARAMS
  )
  state = tx.init(params)
  if mesh is not None:
    data = NamedSharding(mesh, PartitionSpec("data"))
    batch = jax.tree_util.tree_map(lambda x: jax.device_put(x, data), batch)
  update = jax.jit(tx.update)
  for _ in range(steps):
    _, (grads, _) = grad_fn(params, batch, teacher)
    updates, state = update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  return jax.device_get(params), [float(table[i]) for i in range(steps)]


def test_eight_devices_same_params_as_one(setup, grad_fn):
  """The batch split over 8 devices: the same parameters after 3 steps.

  Except the regressor's `norm1_k.bias`: its gradient is mathematically
  zero (a key bias shifts a softmax row uniformly) and its rounding noise,
  which differs with the reduction order, is what AdamW's normalised step
  follows; only its size is bounded (by the learning rates)."""
  _, variables, _, teacher, batch = setup
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  one, lrs = _train(variables, teacher, batch, grad_fn, 3)
  eight, _ = _train(variables, teacher, batch, grad_fn, 3, mesh)
  flat_one = jax.tree_util.tree_flatten_with_path(one)[0]
  for (path, a), b in zip(flat_one, jax.tree_util.tree_leaves(eight)):
    name = jax.tree_util.keystr(path)
    atol = 2 * sum(lrs) if "norm1_k" in name and "bias" in name else 1e-6
    np.testing.assert_allclose(a, b, atol=atol, err_msg=name)
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), one, variables["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4
  # The never-used regresser.norm is frozen: no update, no weight decay.
  assert not any(jax.tree_util.tree_leaves(moved["regresser"]["norm"]))


def test_terms_shapes(setup):
  student, variables, tower, teacher, batch = setup
  terms = jax.eval_shape(
    lambda v, t, b: cae_v2_terms(
      student, v, b["images"], b["images"], b["mask"], NUM_MASKED, clip_teacher(tower), t
    ),
    variables,
    teacher,
    batch,
  )
  out = terms["out"]
  assert out.encoder_out.shape == (8, 1 + 16 - NUM_MASKED, 32)
  assert out.regressor_input.shape == (8, 1 + 16 - NUM_MASKED, 16)
  assert len(out.regressor_blocks) == 1 and out.regressor_out.shape == (8, NUM_MASKED, 16)
  assert terms["labels"].shape == terms["teacher_tokens"].shape == (8, 17, 8)
