"""CLIP image tower, its names (OpenAI / open_clip) and the TorchScript reader."""

import pathlib
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from pth_writer import Evil, write_pth, write_state_dict

from mimdistill.interop import clip_names
from mimdistill.interop.pth_reader import (
  CorruptCheckpointError,
  UnsafeCheckpointError,
  load_pth,
)
from mimdistill.interop.torchscript_reader import (
  is_torchscript_archive,
  read_torch_file,
  read_torchscript,
)
from mimdistill.models.clip import ClipVisual, l2_normalize, resize_positional_embedding

jax.config.update("jax_default_matmul_precision", "highest")

ARCHIVE = REPO / "tests" / "fixtures" / "clip_torchscript" / "ViT-tiny.pt"
EXPECTED = REPO / "tests" / "fixtures" / "clip_torchscript" / "expected.npz"


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _tokens(tensors, images, **kw):
  params, spec, _, layout = clip_names.clip_visual_to_flax(tensors, **kw)
  tower = ClipVisual(**spec.module_kwargs())
  return tower.apply({"params": params}, _nhwc(images)).tokens_proj, spec, layout


def test_torchscript_archive_is_read_like_state_dict():
  """Every parameter and buffer `torch.jit.load(...).state_dict()` gives,
  same dtype (the float16 / float32 split) and values."""
  want = np.load(EXPECTED)
  assert is_torchscript_archive(ARCHIVE)
  ckpt = read_torchscript(ARCHIVE)
  assert ckpt.metadata["format"] == "torchscript"
  assert ckpt.metadata["root_type"].endswith(".CLIP")
  names = list(want["names"])
  assert sorted(ckpt.tensors) == names
  for name, dtype, total, squares in zip(
    names, want["dtypes"], want["sums"], want["sums_of_squares"]
  ):
    value = ckpt.tensors[name].astype(np.float64)
    assert str(ckpt.tensors[name].dtype) == dtype, name
    np.testing.assert_allclose(value.sum(), total, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose((value * value).sum(), squares, rtol=1e-12, err_msg=name)


def test_torchscript_archive_reproduces_official_features():
  want = np.load(EXPECTED)
  params, spec, report, layout = clip_names.read_clip_visual(ARCHIVE)
  assert layout == "openai" and spec.heads == 1  # build_model: width // 64
  assert "input_resolution" in report.skipped and "token_embedding.weight" in report.skipped
  tokens = ClipVisual(**spec.module_kwargs()).apply({"params": params}, _nhwc(want["images"]))
  np.testing.assert_allclose(tokens.tokens_proj, want["tokens_proj"], atol=1e-5)


def test_plain_pth_reader_refuses_torchscript_with_one_line():
  with pytest.raises(UnsafeCheckpointError) as err:
    load_pth(ARCHIVE)
  assert "__torch__" in str(err.value) and "\n" not in str(err.value)


def test_torchscript_reader_imports_no_torch(tmp_path):
  code = (
    "import sys; from mimdistill.interop.torchscript_reader import read_torchscript; "
    f"read_torchscript({str(ARCHIVE)!r}); assert 'torch' not in sys.modules"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    cwd=tmp_path,
    env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-2000:]


def _as_torchscript(path: pathlib.Path, archive: str = "archive") -> pathlib.Path:
  """Adds TorchScript's code/ and constants.pkl records to a torch.save zip."""
  with zipfile.ZipFile(path, "a") as z:
    z.writestr(f"{archive}/code/__torch__/evil.py", "import os\nos.system('touch ran.txt')\n")
    z.writestr(f"{archive}/constants.pkl", b"\x80\x02).")
  return path


@pytest.mark.parametrize(
  "payload",
  [
    Evil("posix", "system", "touch ran.txt"),
    Evil("builtins", "eval", "open('ran.txt', 'w')"),
    # A `__torch__` class is an inert record: calling it with arguments is refused.
    Evil("__torch__.evil", "Module", "touch ran.txt"),
    Evil("__torch__.bad name", "X"),
  ],
  ids=["os.system", "eval", "torch-class-called", "bad-class-name"],
)
def test_hostile_torchscript_refused_nothing_run(tmp_path, monkeypatch, payload):
  monkeypatch.chdir(tmp_path)
  path = _as_torchscript(write_pth(tmp_path / "evil.pt", payload))
  assert is_torchscript_archive(path)
  with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)) as err:
    read_torchscript(path)
  assert "\n" not in str(err.value)
  assert not (tmp_path / "ran.txt").exists()


def test_open_clip_training_checkpoint_layout(tmp_path):
  """open_clip keeps the weights under 'state_dict' with DDP's 'module.'
  prefix and its text tower as 'text.*': the same features come out."""
  want = np.load(EXPECTED)
  tensors = read_torchscript(ARCHIVE).tensors
  state = {f"module.{k}": np.asarray(v) for k, v in tensors.items() if k.startswith("visual.")}
  state["module.text.token_embedding.weight"] = np.zeros((8, 4), np.float32)
  path = write_state_dict(
    tmp_path / "epoch_1.pt", state, wrap="state_dict", extra={"epoch": 1, "name": "run"}
  )
  tokens, _, layout = _tokens(read_torch_file(path).tensors, want["images"])
  assert layout == "open_clip"
  np.testing.assert_allclose(tokens, want["tokens_proj"], atol=1e-5)


def test_open_clip_layout_reproduces_shared_fixture(tmp_path):
  folder = REPO / "tests" / "fixtures" / "clip_visual"  # a copy of ../shared/fixtures/clip_visual
  if not folder.exists():
    pytest.skip(f"{folder} is absent")
  import json

  cfg = json.loads((folder / "config.json").read_text())["model"]
  tensors = load_pth(folder / "clip_visual.pt").tensors
  state = {f"module.{k}": np.asarray(v) for k, v in tensors.items()}
  path = write_state_dict(tmp_path / "open_clip.pt", state, wrap="state_dict", extra={"epoch": 3})
  tokens, spec, _ = _tokens(
    read_torch_file(path).tensors, np.load(folder / "inputs.npz")["images"], heads=cfg["heads"]
  )
  expected = np.load(folder / "expected.npz")
  np.testing.assert_allclose(tokens, expected["tokens_proj"], atol=1e-5)
  np.testing.assert_allclose(l2_normalize(tokens), expected["tokens_proj_l2"], atol=1e-5)


@pytest.mark.parametrize(
  "names, found",
  [
    (["visual.trunk.patch_embed.proj.weight", "visual.head.proj.weight"], "timm tower"),
    (
      ["visual.conv1.weight", "visual.layer1.0.conv1.weight", "visual.attnpool.c_proj.weight"],
      "ModifiedResNet",
    ),
    (["visual.conv1.weight", "visual.attn_pool.query"], "attentional pooler"),
    (
      ["visual.conv1.weight", "visual.transformer.resblocks.0.attn.ln_inner.weight"],
      "custom-block",
    ),
    (["visual.conv1.weight", "visual.transformer.resblocks.0.attn.q_proj_weight"], "q/k/v"),
    (["visual.conv1.weight", "visual.class_embedding", "visual.some_new_thing"], "unknown tensors"),
    (["token_embedding.weight", "transformer.resblocks.0.ln_1.weight"], "no CLIP image tower"),
  ],
  ids=["timm", "resnet", "attn_pool", "custom", "separate-qkv", "unknown", "text-only"],
)
def test_unsupported_layouts_get_one_line_errors(names, found):
  tensors = {n: np.zeros((4, 3, 2, 2) if n.endswith("conv1.weight") else (4,)) for n in names}
  with pytest.raises(clip_names.UnsupportedClipLayout) as err:
    clip_names.clip_visual_to_flax(tensors, what="file.pt")
  message = str(err.value)
  assert found in message and "\n" not in message and "file.pt" in message


@pytest.fixture(scope="module")
def open_clip_style():
  """A tower with open_clip's options: layer scale, no ln_pre, exact GELU."""
  tower = ClipVisual(32, 2, 2, 8, 16, 8, layer_scale=0.5, pre_norm=False, act="gelu")
  variables = tower.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  return tower, jax.device_get(variables["params"])


def test_names_round_trip_with_open_clip_options(open_clip_style):
  tower, params = open_clip_style
  state = clip_names.flax_to_clip_visual(params)
  assert "visual.transformer.resblocks.1.ls_2.gamma" in state
  assert "visual.ln_pre.weight" not in state
  assert state["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
  back, spec, _, layout = clip_names.clip_visual_to_flax(state, heads=2)
  assert layout == "open_clip" and spec.layer_scale and not spec.pre_norm
  same = jax.tree_util.tree_map(np.array_equal, back, params)
  assert jax.tree_util.tree_all(same)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  rebuilt = ClipVisual(**spec.module_kwargs(act="gelu"))
  np.testing.assert_allclose(
    rebuilt.apply({"params": back}, images).tokens_proj,
    tower.apply({"params": params}, images).tokens_proj,
    atol=1e-6,
  )


def test_activation_is_a_field_not_in_the_weights(open_clip_style):
  tower, params = open_clip_style
  images = jax.random.normal(jax.random.PRNGKey(2), (1, 16, 16, 3))
  gelu = tower.apply({"params": params}, images).tokens_proj
  quick = tower.clone(act="quick_gelu").apply({"params": params}, images).tokens_proj
  assert not np.allclose(gelu, quick)
  with pytest.raises(ValueError, match="activation"):
    tower.clone(act="relu").apply({"params": params}, images)


def test_resize_positional_embedding_keeps_class_row():
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1 + 16, 8)).astype(np.float32)
  np.testing.assert_array_equal(resize_positional_embedding(posemb, 4), posemb)
  resized = resize_positional_embedding(posemb, 6)
  assert resized.shape == (37, 8)
  np.testing.assert_array_equal(resized[0], posemb[0])
  # Bilinear, align_corners=False: corners of an upsampled grid are the old corners.
  np.testing.assert_allclose(resized[1], posemb[1], atol=1e-6)
  np.testing.assert_allclose(resized[-1], posemb[-1], atol=1e-6)


def test_tower_refuses_other_image_sizes(open_clip_style):
  tower, params = open_clip_style
  with pytest.raises(ValueError, match="resize its positional embedding"):
    tower.apply({"params": params}, jnp.zeros((1, 24, 24, 3)))
