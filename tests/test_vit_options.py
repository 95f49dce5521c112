"""The ViT options of the families built on the MAE ViT: distillation token,
layer scale, q/v biases, relative position bias."""

import jax
import numpy as np
import pytest
from conftest import shared_path

from mimdistill.models.relative_position import num_relative_distances, relative_position_index
from mimdistill.models.vit import ViTEncoder

IMAGES = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
KW = dict(width=32, depth=2, num_heads=2, patch_size=8, image_size=16)


def test_relative_index_is_a_function_of_the_patch_offset():
  grid = (3, 4)
  for prefix in (1, 2):
    index = relative_position_index(grid, prefix)
    rows = num_relative_distances(grid, prefix)
    assert index.shape == (12 + prefix, 12 + prefix)
    coords = [(r, c) for r in range(3) for c in range(4)]
    by_offset = {}
    for i, (ri, ci) in enumerate(coords):
      for j, (rj, cj) in enumerate(coords):
        by_offset.setdefault((ri - rj, ci - cj), set()).add(index[prefix + i, prefix + j])
    # one table row per offset, distinct offsets -> distinct rows, all < the patch rows
    assert all(len(v) == 1 for v in by_offset.values())
    patch_rows = {next(iter(v)) for v in by_offset.values()}
    assert len(patch_rows) == len(by_offset) == (2 * 3 - 1) * (2 * 4 - 1)
    assert max(patch_rows) < rows - 3 * prefix
    assert index[0, 0] == rows - 1 and index[0, 5] == rows - 3 and index[5, 0] == rows - 2
  index = relative_position_index(grid, 2)
  # TinyMIM*-T's layout: dist entries first, the CLS ones overwrite them
  assert (index[1, 0], index[0, 1], index[1, 1], index[1, 5], index[5, 1]) == (
    rows - 2,
    rows - 3,
    rows - 4,
    rows - 6,
    rows - 5,
  )


@pytest.mark.parametrize(
  "path,key,prefix",
  [
    ("segmentation/seg_model.pth", "backbone.blocks.0.attn.relative_position_index", 1),
    ("star_backbone/star_backbone.pth", "blocks.0.attn.relative_position_index", 2),
  ],
)
def test_relative_index_equals_the_official_buffer(path, key, prefix):
  from mimdistill.interop.pth_reader import load_pth

  official = np.asarray(load_pth(shared_path("fixtures", path)).tensors[key])
  grid = int(round((official.shape[0] - prefix) ** 0.5))
  np.testing.assert_array_equal(relative_position_index((grid, grid), prefix), official)


def _params(model):
  return model.init(jax.random.PRNGKey(0), IMAGES)


def test_dist_token_order_and_position_rows():
  model = ViTEncoder(**KW, dist_token=True, pos_embed_type="learned")
  v = _params(model)
  assert v["params"]["pos_embed"].shape == (1, 2 + 4, 32)
  np.testing.assert_array_equal(v["params"]["pos_embed"][0, :2], 0)
  v = jax.tree_util.tree_map(
    lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), v
  )
  tokens = model.apply(v, IMAGES, method=lambda m, x: m.prepend_prefix(m.embed_patches(x)))
  p = v["params"]
  np.testing.assert_allclose(tokens[0, 0], p["cls_token"][0, 0] + p["pos_embed"][0, 0], atol=1e-6)
  np.testing.assert_allclose(tokens[1, 1], p["dist_token"][0, 0] + p["pos_embed"][0, 1], atol=1e-6)
  assert model.apply(v, IMAGES).shape == (2, 6, 32)


def test_layer_scale_qv_bias_and_relative_bias_enter_the_forward():
  model = ViTEncoder(**KW, layer_scale=0.1, qkv_bias="qv", rel_pos_bias=True, pos_embed_type="none")
  v = _params(model)
  block = v["params"]["blocks_0"]
  assert "bias" not in block["attn"]["qkv"] and block["attn"]["q_bias"].shape == (32,)
  np.testing.assert_array_equal(block["gamma_1"], np.float32(0.1))
  assert block["attn"]["relative_position_bias_table"].shape == (9 + 3, 2)
  assert "pos_embed" not in v["params"] and "fixed" not in v
  base = model.apply(v, IMAGES)
  for path in (
    ("gamma_1",),
    ("attn", "q_bias"),
    ("attn", "v_bias"),
    ("attn", "relative_position_bias_table"),
  ):
    changed = jax.tree_util.tree_map(np.array, v)
    node = changed["params"]["blocks_1"]
    for key in path[:-1]:
      node = node[key]
    # not a constant: softmax ignores a bias shared by a whole row
    node[path[-1]] = node[path[-1]] + 0.1 * np.arange(node[path[-1]].size).reshape(
      node[path[-1]].shape
    )
    assert np.abs(model.apply(changed, IMAGES) - base).max() > 1e-4, path


def test_scanned_options_match_unrolled():
  kw = dict(KW, layer_scale=0.5, qkv_bias="qv", rel_pos_bias=True, dist_token=True)
  plain, scanned = ViTEncoder(**kw), ViTEncoder(**kw, scan_blocks=True)
  v = _params(plain)
  v = jax.tree_util.tree_map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape), v
  )
  np.testing.assert_allclose(plain.apply(v, IMAGES), scanned.apply(v, IMAGES), atol=1e-5)


def test_block_outputs_are_prefixes_of_the_forward():
  model = ViTEncoder(**KW, final_norm=False)
  v = _params(model)
  outs = model.apply(v, IMAGES, [0, 1], method=ViTEncoder.block_outputs)
  np.testing.assert_allclose(outs[1], model.apply(v, IMAGES), atol=1e-6)
  np.testing.assert_allclose(outs[0], model.apply(v, IMAGES, stop_after=1), atol=1e-6)
  with pytest.raises(ValueError, match="out_indices"):
    model.apply(v, IMAGES, [1, 2], method=ViTEncoder.block_outputs)
