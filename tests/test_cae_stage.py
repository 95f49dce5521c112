"""The CAE v2 stage on tiny models: presets, early one-line errors (token
grids, masked count, teacher layouts), the block masks of the input pipeline
(resumable: a function of seed and stream position), 8 devices vs 1 through
`loop.prepare`, a 3-step run from a tiny stage-1 workdir (teacher never
saved), a CLIP teacher from the caev2 fixture's OpenAI-layout file, and the
pipeline's `cae:` preset."""

import sys

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_RUN, data_config, set_path, take

from mimdistill.data import input_pipeline
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.stages import cae, pretrain, registry
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import sharding as shard_lib

sys.path.insert(0, str(REPO))
from configs import cae as cae_config  # noqa: E402
from configs import finetune as finetune_config  # noqa: E402
from configs import mae_pretrain  # noqa: E402
from configs import pipeline as pipeline_config  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "caev2"
TEACHER = dict(width=32, depth=1, num_heads=2, patch_size=8, image_size=32)
STUDENT = dict(width=16, depth=1, num_heads=2, patch_size=8, image_size=32)


def tiny_config(tfds_dir=None, **overrides):
  """quickstart at test size: 4 x 4 patches, 5 masked, a ViT teacher."""
  c = cae_config.get_config("quickstart")
  c.teacher.update(variant="custom", source="unused", **TEACHER)
  c.model.update(variant="custom", **STUDENT)
  c.model.regressor.update(width=16, depth=1, num_heads=2)
  c.mask.update(num_patches=5, min_patches_per_block=2)
  c.data.update(data_dir=tfds_dir and str(tfds_dir), num_workers=0)
  c.mesh.num_devices = 1
  c.update(TINY_RUN)
  for k, v in overrides.items():
    set_path(c, k, v)
  return c


# -----------------------------------------------------------------------------
# Configs and errors (nothing compiles)
# -----------------------------------------------------------------------------
@pytest.mark.parametrize(
  "size,masked,reg", [("tiny", 30, (96, 1)), ("small", 49, (384, 1)), ("base", 98, (768, 4))]
)
def test_official_presets(size, masked, reg):
  c = cae_config.get_config(size)
  cae.validate(c, data=False)
  assert c.model.variant == size and c.model.num_heads == 12  # ViT-T too
  assert cae.num_masked(c) == masked and (c.model.regressor.width, c.model.regressor.depth) == reg
  assert c.model.regressor.num_heads == 12 and c.model.regressor.layer_scale == 0.1
  assert (c.total_epochs, c.warmup_epochs, c.lr, c.min_lr) == (300, 10, 1.5e-3, 1e-5)
  assert (c.optimizer.weight_decay, c.optimizer.clip_grad_norm, c.optimizer.b2) == (
    0.05,
    3.0,
    0.999,
  )
  assert (c.teacher.source, c.teacher.output_dim, c.data.crop_scale) == (
    "ViT-B-16.pt",
    512,
    (0.4, 1.0),
  )
  f = finetune_config.get_config(f"cae_{size}")
  assert f.model.variant == size and f.model.num_heads == 12
  assert (f.model.layer_scale, f.model.qkv_bias) == (0.1, "qv")
  want = {"tiny": (4e-3, 0.85, 100), "small": (4e-4, 0.75, 200), "base": (2e-4, 0.75, 100)}
  assert (f.lr, f.optimizer.layer_decay, f.total_epochs) == want[size]


def test_quickstart_preset_uses_the_stage1_quickstart_teacher():
  c = cae_config.get_config("quickstart")
  cae.validate(c, data=False)
  pre = mae_pretrain.get_config("quickstart")
  assert c.teacher.source == "workdirs/quickstart/pretrain" and c.teacher.type == "vit"
  for key in ("width", "depth", "num_heads", "patch_size", "image_size"):
    assert c.teacher[key] == pre.model[key]
  assert cae.num_masked(c) == 10 and c.total_epochs == 7.0
  p = pipeline_config.get_config("cae:quickstart")
  assert p.stages == "pretrain,cae,finetune" and p.cae.stage == "cae"
  assert (p.finetune.model.layer_scale, p.finetune.model.qkv_bias) == (0.1, "qv")
  assert pipeline_config.get_config("cae:imagenet").stages == "cae,finetune"


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model.patch_size": 4}, r"8x8 token grid.*4x4 one|4x4 token grid.*8x8 one"),
    ({"mask.num_patches": 16}, r"mask.num_patches=16 must be below the 16 patches"),
    ({"teacher.type": "dino"}, r"teacher.type='dino' is not a known teacher layout"),
    ({"model.variant": "custom", "mask.num_patches": 0}, r"mask.num_patches=0 takes the official"),
    ({"teacher.image_size": 64}, r"teacher.image_size=64 differs from data.image_size=32"),
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ValueError, match=match) as err:
    cae.validate(tiny_config(**overrides), data=False)
  assert "\n" not in str(err.value)


def test_teacher_source_errors(tmp_path):
  from pth_writer import write_state_dict

  odd = write_state_dict(
    tmp_path / "odd.pth", {"backbone.stem.weight": np.zeros((2, 2), np.float32)}
  )
  with pytest.raises(ValueError, match=r"unknown teacher layout \(1 tensors: backbone.stem"):
    cae.teacher_type(tiny_config(**{"teacher.source": str(odd)}))
  with pytest.raises(ValueError, match=r"teacher.type='clip' but .* not a .pt/.pth file"):
    cae.teacher_type(tiny_config(**{"teacher.type": "clip", "teacher.source": str(tmp_path)}))
  clip = str(FIXTURE / "clip_teacher.pt")
  with pytest.raises(ValueError, match=r"teacher.type='vit' but .* holds a clip"):
    cae.teacher_type(tiny_config(**{"teacher.type": "vit", "teacher.source": clip}))
  # The fixture's CLIP has patch 4: an 8x8 grid, the student's is 4x4.
  c = tiny_config(**{"teacher.type": "clip", "teacher.source": clip, "teacher.variant": "custom"})
  for key in TEACHER:
    c.teacher[key] = None
  c.teacher.update(image_size=32, output_dim=0)
  with pytest.raises(ValueError, match=r"CLIP .*8x8 token grid.*set --config.model.patch_size=4"):
    cae.validate(c)


# -----------------------------------------------------------------------------
# Block masks in the input pipeline
# -----------------------------------------------------------------------------
def test_pipeline_block_masks_are_reproducible(data_dir):
  c = tiny_config(data_dir)
  cfg = cae.data_config(c)
  assert (cfg.augment, cfg.mask_grid, cfg.num_masked) == ("cae", 4, 5)
  pipe = input_pipeline.make_dataset(cfg, split="train", train=True, seed=3)
  first = take(pipe, 2)
  again = take(pipe, 2)  # a fresh pass: the same masks (seed, position)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["patch_mask"], b["patch_mask"])
    np.testing.assert_array_equal(a["image"], b["image"])
  masks = np.concatenate([b["patch_mask"] for b in first])
  assert masks.shape == (32, 4, 4) and masks.dtype == bool
  assert (masks.reshape(32, -1).sum(1) == 5).all()
  assert len({m.tobytes() for m in masks}) > 16  # drawn per example
  # A resumed iterator continues with the same masks as an uninterrupted one.
  it = iter(pipe)
  next(it)
  state = it.get_state()
  it.close()
  resumed = iter(input_pipeline.make_dataset(cfg, split="train", train=True, seed=3))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["patch_mask"], first[1]["patch_mask"])
  resumed.close()
  other = take(
    input_pipeline.make_dataset(
      data_config(data_dir, "cae", mask_grid=4, num_masked=5), split="train", train=True, seed=4
    ),
    1,
  )
  assert not np.array_equal(other[0]["patch_mask"], first[0]["patch_mask"])


# -----------------------------------------------------------------------------
# 8 devices vs 1, through loop.prepare
# -----------------------------------------------------------------------------
def test_eight_devices_same_params_as_one():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 fake CPU devices of conftest.py")
  config = tiny_config(**{"model.drop_path": 0.0})
  teacher_fn, teacher_vars, width = cae.random_teacher(config)
  student = cae.build_student(config, width)
  gen = cae.mask_generator(config)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
    "patch_mask": gen.batch(rng, 16),
  }
  params = {}
  for n in (1, 8):
    task = cae.build_task(config, student, teacher_fn, teacher_vars, "vit", 100)
    prep = loop_lib.prepare(
      task, shard_lib.make_mesh(1, devices=jax.devices()[:n]), jax.random.PRNGKey(0)
    )
    state = prep.init_state()
    placed = prep.place_batch(batch)
    for _ in range(3):
      state, metrics = prep.update(state, placed, prep.inputs)
    params[n] = jax.device_get(state.params)
    assert np.isfinite(float(metrics["loss"]))
  init = jax.device_get(task.init_variables(jax.random.split(jax.random.PRNGKey(0))[0])["params"])
  flat = jax.tree_util.tree_flatten_with_path(params[1])[0]
  for (path, a), b in zip(flat, jax.tree_util.tree_leaves(params[8])):
    name = jax.tree_util.keystr(path)
    # norm1_k.bias: a mathematically zero gradient whose rounding noise AdamW
    # normalises (see test_caev2); only its size is bounded, by the lrs.
    atol = 3 * 2 * config.lr if "norm1_k" in name and "bias" in name else 1e-5
    np.testing.assert_allclose(a, b, atol=atol, err_msg=name)
  # The unused regresser.norm is frozen; cls_token and mask_token are
  # decayed like every other >1-D param (the official groups).
  np.testing.assert_array_equal(
    params[8]["regresser"]["norm"]["scale"], init["regresser"]["norm"]["scale"]
  )
  assert not np.array_equal(params[8]["mask_token"], init["mask_token"])
  decayed = opt_lib.decay_mask(init)
  assert decayed["mask_token"] and decayed["encoder"]["cls_token"]
  assert not decayed["encoder"]["blocks_0"]["gamma_1"]


# -----------------------------------------------------------------------------
# End to end
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1_workdir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("stage1")
  c = mae_pretrain.get_config("quickstart")
  c.model.update(**TEACHER)
  c.model.decoder.update(width=16, depth=1, num_heads=2)
  c.data.update(data_dir=str(tfds_dir), num_workers=0)
  c.batch_size, c.total_steps, c.warmup_epochs, c.lr = 16, 2, 0.0, 1e-3
  c.log_every, c.checkpoint_every, c.async_checkpoints = 1, 2, False
  c.num_visualize = 0
  c.mesh.num_devices = 1
  pretrain.run(c, workdir)
  return workdir


def test_three_steps_from_a_stage1_workdir(stage1_workdir, data_dir, tmp_path):
  c = tiny_config(data_dir, **{"teacher.source": str(stage1_workdir), "teacher.type": "auto"})
  # The workdir's record fills a custom teacher section.
  for key in ("width", "depth", "num_heads", "patch_size"):
    c.teacher[key] = None
  summary = registry.run_stage(c, tmp_path / "cae")
  assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
  assert summary["teacher_type"] == "vit" and c.teacher.width == 32
  lineage = (tmp_path / "cae" / "lineage.json").read_text()
  assert '"stage": "cae"' in lineage and "checkpoints/2" in lineage
  params, _ = restore_subtree(str(tmp_path / "cae"), ("params",))
  assert set(params) == {"encoder", "regresser", "mask_token", "decoder"}
  assert params["decoder"]["head"]["kernel"].shape == (16, 32)  # to the teacher's width
  # The encoder restores by name for fine-tuning (CAE's layer scale, q/v biases).
  assert "gamma_1" in params["encoder"]["blocks_0"]
  assert "q_bias" in params["encoder"]["blocks_0"]["attn"]


def test_clip_teacher_from_an_openai_state_dict():
  """The caev2 fixture's tiny OpenAI-layout CLIP (patch 4, 32 px, 24-wide
  tokens) as the teacher of a patch-4 student: its tokens are the fixture's."""
  folder = FIXTURE
  if not folder.exists():
    pytest.skip(f"{folder} is absent")
  c = tiny_config(**{"teacher.source": str(folder / "clip_teacher.pt"), "model.patch_size": 4})
  c.teacher.update(type="auto", variant="custom", output_dim=0)
  for key in ("width", "depth", "num_heads", "patch_size"):
    c.teacher[key] = None
  c.mask.num_patches = 16
  cae.validate(c, data=False)
  teacher_fn, variables, width, record = cae.load_teacher(c)
  assert (width, record["kind"], record["layout"], c.teacher.num_heads) == (24, "clip", "openai", 1)
  inputs, expected = np.load(folder / "inputs.npz"), np.load(folder / "expected.npz")
  # 'images' is the CLIP-normalised view, 'samples' the student's.
  tokens = teacher_fn(variables, inputs["images"].transpose(0, 2, 3, 1))
  np.testing.assert_allclose(tokens, expected["clip_tokens"], atol=1e-5)
