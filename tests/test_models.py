"""Model invariants: shapes, masking, relations, truncated forward, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimdistill.models import zoo
from mimdistill.models.mae import MAE, patchify, random_masking, unpatchify
from mimdistill.models.vit import ViTEncoder, drop_path_rates
from mimdistill.objectives.relations import relation_losses, relations

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(KEY, (2, 32, 32, 3))


@pytest.fixture(scope="module")
def encoder():
  model = ViTEncoder(width=32, depth=2, num_heads=4, patch_size=8, image_size=32)
  return model, model.init(KEY, IMAGES)


def test_encoder_shapes_and_collections(encoder):
  model, variables = encoder
  assert set(variables) == {"params", "fixed"}
  assert variables["fixed"]["pos_embed"].shape == (1, 17, 32)
  out = model.apply(variables, IMAGES)
  assert out.shape == (2, 17, 32)
  assert np.isfinite(np.asarray(out)).all()


def test_truncated_forward_is_prefix_of_full(encoder):
  model, variables = encoder
  # Block 1 alone equals the first block of a depth-1 model with the same weights.
  partial = model.apply(variables, IMAGES, stop_after=1)
  shallow = ViTEncoder(
    width=32, depth=1, num_heads=4, patch_size=8, image_size=32, final_norm=False
  )
  params = {
    k: v for k, v in variables["params"].items() if k in ("patch_embed", "cls_token", "blocks_0")
  }
  direct = shallow.apply({"params": params, "fixed": variables["fixed"]}, IMAGES)
  np.testing.assert_allclose(partial, direct, atol=1e-6)


def test_truncated_jaxpr_has_no_later_blocks(encoder):
  model, variables = encoder
  full = str(jax.make_jaxpr(lambda v: model.apply(v, IMAGES))(variables))
  trunc = str(jax.make_jaxpr(lambda v: model.apply(v, IMAGES, stop_after=1))(variables))
  # One block is ~ one softmax-bearing attention; the truncated graph has half.
  assert full.count("exp") > trunc.count("exp") > 0


def test_relations_rows_sum_to_one_with_other_head_count(encoder):
  model, variables = encoder
  for heads in (1, 2, 4, 8):  # R independent of the block's 4 attention heads
    q, k, v = model.apply(variables, IMAGES, block=2, heads=heads, method=ViTEncoder.relation_qkv)
    assert q.shape == (2, heads, 17, 32 // heads)
    rel = relations((q, k, v))
    for logits in rel.values():
      rows = jax.nn.softmax(logits, axis=-1).sum(-1)
      np.testing.assert_allclose(rows, 1.0, atol=1e-5)
    losses = relation_losses(rel, rel)
    np.testing.assert_allclose(losses["qk"], 0.0, atol=1e-6)


def test_relation_block_out_of_range(encoder):
  model, variables = encoder
  with pytest.raises(ValueError, match="outside 1..2"):
    model.apply(variables, IMAGES, block=3, heads=4, method=ViTEncoder.relation_qkv)


def test_masking_invariants():
  noise = jax.random.uniform(KEY, (3, 16))
  m = random_masking(noise, 0.75)
  assert m.ids_keep.shape == (3, 4)
  np.testing.assert_array_equal(m.mask.sum(1), 12)
  # Kept indices are exactly the unmasked positions, and ids_restore inverts the shuffle.
  for b in range(3):
    kept = set(np.asarray(m.ids_keep[b]).tolist())
    assert kept == set(np.flatnonzero(np.asarray(m.mask[b]) == 0).tolist())
    shuffle = np.argsort(np.asarray(noise[b]))
    np.testing.assert_array_equal(shuffle[np.asarray(m.ids_restore[b])], np.arange(16))
  with pytest.raises(ValueError, match="mask_ratio"):
    random_masking(noise, 1.0)


def test_patchify_roundtrip_and_order():
  x = jax.random.normal(KEY, (2, 16, 16, 3))
  p = patchify(x, 4)
  assert p.shape == (2, 16, 48)
  np.testing.assert_array_equal(unpatchify(p, 4), x)
  # First patch, first pixel row: (q, c) fastest, as MAE's nhwpqc.
  np.testing.assert_array_equal(p[0, 0, :12], x[0, 0, :4].reshape(-1))


def test_mae_forward_shapes():
  model = MAE(
    width=32,
    depth=1,
    num_heads=4,
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=4,
    patch_size=8,
    image_size=32,
  )
  noise = jax.random.uniform(KEY, (2, 16))
  variables = model.init(KEY, IMAGES, noise, 0.75)
  assert set(variables["params"]) == {"encoder", "decoder"}
  out = model.apply(variables, IMAGES, noise, 0.75)
  assert out.latent.shape == (2, 1 + 4, 32)
  assert out.pred.shape == (2, 16, 8 * 8 * 3)


def test_official_init_statistics():
  model = ViTEncoder(width=64, depth=1, num_heads=4, patch_size=4, image_size=32)
  params = model.init(KEY, jnp.zeros((1, 32, 32, 3)))["params"]
  # Patch embedding: xavier on the flattened (D, C*p*p) matrix.
  bound = np.sqrt(6 / (3 * 16 + 64))
  k = np.asarray(params["patch_embed"]["kernel"])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])
  assert np.abs(qkv).max() <= np.sqrt(6 / (64 + 192))
  assert not np.any(params["blocks_0"]["attn"]["qkv"]["bias"])
  np.testing.assert_allclose(np.std(params["cls_token"]), 0.02, rtol=0.5)


def test_drop_path_schedules():
  assert drop_path_rates(0.1, 3, "linear") == (0.0, 0.05, 0.1)
  assert drop_path_rates(0.1, 3, "constant_but_last") == (0.1, 0.1, 0.0)


def test_zoo_variants_and_errors():
  assert zoo.resolve({"variant": "base"}).width == 768
  assert zoo.resolve({"variant": "huge"}).patch_size == 14
  with pytest.raises(ValueError, match="unknown model variant 'giant'"):
    zoo.resolve({"variant": "giant"})
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    zoo.resolve({"variant": "tiny", "image_size": 30})
