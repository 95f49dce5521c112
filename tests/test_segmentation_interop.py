"""mmcv segmentation checkpoints <-> Flax trees, and a plain ViT encoder as
the backbone's initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pth_writer import write_state_dict
from test_segmentation_model import tiny_config

from mimdistill.interop.pth_reader import load_pth
from mimdistill.interop.segmentation_init import init_backbone
from mimdistill.interop.segmentation_names import (
  SegmentationCheckpointError,
  flax_to_mmcv,
  mmcv_to_flax,
)
from mimdistill.models import factory
from mimdistill.models.vit import ViTEncoder


def _random_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)

  def make(s):
    if np.issubdtype(s.dtype, np.integer):
      return rng.integers(0, 100, s.shape).astype(s.dtype)
    return rng.normal(size=s.shape).astype(s.dtype)

  return jax.tree_util.tree_map(make, shapes)


VARIANTS = {
  "tinymim": {},
  "tinymim_star": dict(
    width=16, depth=12, out_indices=(3, 5, 7, 11), neck="tinymim_star", fc_dim=24
  ),
  "patch8": dict(patch_size=8),
  "plain": dict(layer_scale=None, rel_pos_bias=False, pos_embed_type="none"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variables(request):
  config = tiny_config(**VARIANTS[request.param])
  model = factory.build("segmentor", config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3))))
  return _random_tree(dict(shapes))


def test_mmcv_names_and_layouts(variables):
  state = flax_to_mmcv(variables, {"iter": 3})["state_dict"]
  has_table = "relative_position_bias_table" in str(jax.tree_util.tree_structure(variables))
  assert ("backbone.blocks.0.attn.relative_position_index" in state) == has_table
  assert "backbone.patch_embed.proj.weight" in state
  assert state["backbone.patch_embed.proj.weight"].shape[1] == 3  # (D, C, p, p)
  assert "decode_head.psp_modules.0.1.conv.weight" in state
  assert "decode_head.psp_modules.0.1.bn.running_var" in state
  assert state["decode_head.fpn_bottleneck.bn.num_batches_tracked"].dtype == np.int64
  assert "auxiliary_head.convs.0.conv.weight" in state
  # ConvTranspose2d weights are (in, out, kh, kw).
  enc = variables["params"]["backbone"]["fpn1_0"]["kernel"]
  assert state["backbone.fpn1.0.weight"].shape == (enc.shape[2], enc.shape[3], 2, 2)


def test_round_trip_through_a_pth_file(variables, tmp_path):
  ckpt = flax_to_mmcv(variables, {"iter": 3})
  path = write_state_dict(
    tmp_path / "seg.pth", ckpt["state_dict"], wrap="state_dict", extra={"meta": {"iter": 3}}
  )
  loaded = load_pth(path)
  back, report = mmcv_to_flax(loaded.tensors)
  assert all("relative_position_index" in k for k in report.skipped)
  flat = lambda t: {
    "/".join(str(k.key) for k in p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]
  }
  a, b = flat(variables), flat(back)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  again = flax_to_mmcv(back)["state_dict"]
  for name, value in ckpt["state_dict"].items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_a_wrong_relative_position_index_is_refused(variables):
  state = dict(flax_to_mmcv(variables)["state_dict"])
  name = "backbone.blocks.0.attn.relative_position_index"
  if name not in state:
    pytest.skip("no relative position bias in this variant")
  if name not in state:
    pytest.skip("no relative position bias in this variant")
  state[name] = state[name][::-1].copy()
  with pytest.raises(SegmentationCheckpointError, match="relative position index"):
    mmcv_to_flax(state)


def test_a_foreign_name_is_refused(variables):
  state = dict(flax_to_mmcv(variables)["state_dict"])
  state["neck.lateral.weight"] = np.zeros(3, np.float32)
  with pytest.raises(SegmentationCheckpointError, match="not a segmentor name"):
    mmcv_to_flax(state)


def test_plain_encoder_initialises_the_backbone():
  model = factory.build("segmentor", tiny_config())
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  template = _random_tree(dict(shapes))["params"]["backbone"]
  # An MAE-style encoder pre-trained at 64 px: no rel-pos, no layer scale, a final norm.
  vit = ViTEncoder(32, 4, 2, 16, 64, pos_embed_type="learned")
  shapes = jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  encoder = _random_tree(shapes["params"], seed=1)
  params, report = init_backbone(template, encoder)
  assert params["encoder"]["pos_embed"].shape == template["encoder"]["pos_embed"].shape
  np.testing.assert_array_equal(params["encoder"]["pos_embed"][:, 0], encoder["pos_embed"][:, 0])
  np.testing.assert_array_equal(
    params["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
    encoder["blocks_1"]["attn"]["qkv"]["kernel"],
  )
  assert "encoder/blocks_0/attn/relative_position_bias_table" in report.initialised
  assert "encoder/blocks_0/gamma_1" in report.initialised
  assert "norm/scale" in " ".join(report.skipped)
  assert "encoder/pos_embed" in report.resized
  assert "fpn1_0/kernel" in report.initialised


def test_an_encoder_of_another_depth_is_refused():
  model = factory.build("segmentor", tiny_config())
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  template = _random_tree(dict(shapes))["params"]["backbone"]
  vit = ViTEncoder(32, 2, 2, 16, 32, pos_embed_type="learned")
  encoder = _random_tree(
    jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
  )
  with pytest.raises(ValueError, match="blocks_2"):
    init_backbone(template, encoder)
