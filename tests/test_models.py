"""Model invariants: shapes, masking, relations, truncated forward, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimdistill.models import factory, variants
from mimdistill.models.mae import MAE, patchify, random_masking, unpatchify
from mimdistill.models.vit import ViTEncoder, drop_path_rates
from mimdistill.objectives.relations import relations

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


def test_relation_heads_split_the_block_qkv_whatever_its_own_heads(encoder):
  """R relation heads are a reshape of block k's norm1 + qkv projection, for
  any R (the block has 4 attention heads), and the relation logits are
  q_r k_r^T / sqrt(D/R) of those slices."""
  model, variables = encoder
  block = variables["params"]["blocks_1"]
  x = model.apply(variables, IMAGES, stop_after=1)
  ln = block["norm1"]
  mu = x.mean(-1, keepdims=True)
  h = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * ln["scale"] + ln["bias"]
  proj = np.asarray(h @ block["attn"]["qkv"]["kernel"] + block["attn"]["qkv"]["bias"])
  q_all, k_all = proj[..., :32], proj[..., 32:64]
  for heads in (1, 2, 8):
    q, k, v = model.apply(variables, IMAGES, block=2, heads=heads, method=ViTEncoder.relation_qkv)
    assert q.shape == (2, heads, 17, 32 // heads)
    np.testing.assert_allclose(
      np.asarray(q).transpose(0, 2, 1, 3).reshape(2, 17, 32), q_all, atol=1e-5
    )
    d = 32 // heads
    qh = q_all.reshape(2, 17, heads, d).transpose(0, 2, 1, 3)
    kh = k_all.reshape(2, 17, heads, d).transpose(0, 2, 1, 3)
    want = np.einsum("bhqd,bhkd->bhqk", qh, kh) / np.sqrt(d)
    np.testing.assert_allclose(relations((q, k, v))["qk"], want, atol=1e-4)


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
    encoder=ViTEncoder(width=32, depth=1, num_heads=4, patch_size=8, image_size=32),
    decoder_width=32,
    decoder_depth=1,
    decoder_heads=4,
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


def test_variants_and_errors():
  assert variants.resolve({"variant": "base"}).width == 768
  assert variants.resolve({"variant": "huge"}).patch_size == 14
  with pytest.raises(ValueError, match="unknown model variant 'giant'"):
    variants.resolve({"variant": "giant"})
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    variants.resolve({"variant": "tiny", "image_size": 30})


def test_factory_builds_from_a_section_and_only_passes_what_it_sets():
  section = {
    "variant": "custom",
    "width": 32,
    "depth": 2,
    "num_heads": 4,
    "patch_size": 8,
    "image_size": 32,
    "drop_path": 0.1,
    "drop_path_schedule": "constant_but_last",
    "decoder": {"width": 32, "depth": 1, "num_heads": 4},
  }
  enc = factory.build("encoder", section, depth=1, final_norm=False)
  assert (enc.depth, enc.final_norm, enc.drop_path, enc.fused_attention) == (
    1,
    False,
    (0.0,),
    False,
  )
  mae = factory.build("mae", section, dtype="bfloat16")
  assert mae.encoder.drop_path == (0.1, 0.0) and mae.decoder_depth == 1
  clf = factory.build("classifier", dict(section, global_pool=False), num_classes=7)
  assert clf.encoder.final_norm and clf.encoder.pos_embed_type == "learned"
  with pytest.raises(ValueError, match="unknown model kind 'resnet'"):
    factory.build("resnet", section)
  with pytest.raises(ValueError, match="dtype='fp8'"):
    factory.build("encoder", section, dtype="fp8")
