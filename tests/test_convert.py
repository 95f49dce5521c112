"""Checkpoint conversion: `python -m mimdistill.convert SRC DST`.

Test checkpoints are tiny official-format `.pth` files written without torch
(`pth_writer`); names and shapes follow the official modules (MAE
`models_mae` / `models_vit`, TinyMIM, timm `VisionTransformer`) and are
spelled out here independently of the code under test.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from conftest import REPO
from pth_writer import Evil, tensor, write_pth, write_state_dict

from mimdistill import convert as cli
from mimdistill import workdir as workdir_lib
from mimdistill.interop.conversion import (
  SafetensorsError,
  convert,
  read_safetensors,
  read_source,
)
from mimdistill.interop.layouts import LayoutError, ModelSpec, detect
from mimdistill.interop.official_names import official_to_flax
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.interop.pth_reader import (
  CheckpointReadError,
  CorruptCheckpointError,
  UnsafeCheckpointError,
  load_pth,
)

BLOCK = (
  "norm1.weight",
  "norm1.bias",
  "attn.qkv.weight",
  "attn.qkv.bias",
  "attn.proj.weight",
  "attn.proj.bias",
  "norm2.weight",
  "norm2.bias",
  "mlp.fc1.weight",
  "mlp.fc1.bias",
  "mlp.fc2.weight",
  "mlp.fc2.bias",
)


def _block(prefix: str, d: int) -> dict[str, tuple]:
  return dict(
    zip(
      BLOCK,
      [
        (d,),
        (d,),
        (3 * d, d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (4 * d, d),
        (4 * d,),
        (d, 4 * d),
        (d,),
      ],
    )
  )


def official_shapes(
  kind: str,
  d: int = 32,
  depth: int = 2,
  p: int = 4,
  image: int = 16,
  chans: int = 3,
  dec: tuple[int, int] = (16, 1),
  classes: int = 5,
) -> dict[str, tuple]:
  """State-dict shapes, in the official modules' order, of:
  'encoder' (MAE pre-trained encoder / TinyMIM student), 'mae' (with decoder),
  'finetune' (models_vit, global pool: fc_norm, no norm), 'finetune_cls'
  (CLS pooling: norm + head), 'timm' (timm VisionTransformer, CLS pooling)."""
  n = 1 + (image // p) ** 2
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, n, d)}
  if kind == "mae":
    shapes.update({"mask_token": (1, 1, dec[0]), "decoder_pos_embed": (1, n, dec[0])})
  shapes.update({"patch_embed.proj.weight": (d, chans, p, p), "patch_embed.proj.bias": (d,)})
  for i in range(depth):
    shapes.update({f"blocks.{i}.{k}": v for k, v in _block("blocks", d).items()})
  if kind != "finetune":
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
  if kind == "mae":
    shapes.update({"decoder_embed.weight": (dec[0], d), "decoder_embed.bias": (dec[0],)})
    for i in range(dec[1]):
      shapes.update({f"decoder_blocks.{i}.{k}": v for k, v in _block("", dec[0]).items()})
    shapes.update(
      {
        "decoder_norm.weight": (dec[0],),
        "decoder_norm.bias": (dec[0],),
        "decoder_pred.weight": (p * p * chans, dec[0]),
        "decoder_pred.bias": (p * p * chans,),
      }
    )
  if kind in ("finetune", "finetune_cls", "timm"):
    shapes.update({"head.weight": (classes, d), "head.bias": (classes,)})
  if kind == "finetune":
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,)})
  return shapes


def random_state(shapes: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def assert_same_tensors(got: dict, want: dict, *, order: bool = True):
  assert (list(got) if order else sorted(got)) == (list(want) if order else sorted(want))
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    assert got[name].shape == value.shape, name
    assert np.asarray(got[name]).tobytes() == np.asarray(value).tobytes(), name


KINDS = {  # kind -> (expected layout, writer kwargs)
  "encoder": ("vit", {}),
  "mae": ("mae", {}),
  "finetune": ("classifier", {}),
  "finetune_cls": ("classifier", {}),
  "timm": ("classifier", {"wrap": None}),  # timm state dicts are saved bare
}


# -----------------------------------------------------------------------------
# Round trips, bit-exact, for every layout
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_bit_exact(tmp_path, kind):
  layout, kwargs = KINDS[kind]
  state = random_state(official_shapes(kind), seed=len(kind))
  pth = write_state_dict(tmp_path / "src.pth", state, **kwargs)

  # .pth -> Orbax folder -> .safetensors -> Orbax folder -> .safetensors
  r1 = convert(pth, tmp_path / "w1", num_heads=4, decoder_num_heads=4)
  assert r1.spec.layout == layout and r1.dst_kind == "orbax"
  assert r1.used == list(state) and not r1.missing and not r1.skipped
  convert(tmp_path / "w1", tmp_path / "a.safetensors")
  convert(tmp_path / "a.safetensors", tmp_path / "w2")
  r4 = convert(tmp_path / "w2", tmp_path / "b.safetensors")
  assert r4.spec == r1.spec  # heads travel in model.json / safetensors metadata
  for path in ("a.safetensors", "b.safetensors"):
    got, meta = read_safetensors(tmp_path / path)
    assert_same_tensors(got, state)
    assert meta["format"] == "pt"

  # The converted variables are exactly official_to_flax of the original,
  # with the encoder under `encoder`.
  names_layout = "classifier" if layout == "classifier" else "mae"
  want, _ = official_to_flax(state, names_layout, learned_pos_embed=layout == "classifier")
  for folder in ("w1", "w2"):
    loaded = ReadBack(tmp_path / folder)
    assert loaded.spec.layout == layout
    flat_got = _flat(loaded.variables)
    flat_want = _flat(want)
    assert sorted(flat_got) == sorted(flat_want)
    for key, value in flat_want.items():
      assert (
        flat_got[key].dtype == value.dtype
        and flat_got[key].tobytes() == np.ascontiguousarray(value).tobytes()
      ), key

  # .pth -> .safetensors directly, and a workdir source to a workdir.
  convert(pth, tmp_path / "c.safetensors")
  assert_same_tensors(read_safetensors(tmp_path / "c.safetensors")[0], state)
  convert(tmp_path / "w1:0", tmp_path / "w3")
  assert_same_tensors(read_source(tmp_path / "w3").tensors, state, order=False)


class ReadBack:
  """A converted folder read the way the stages read a workdir (its whole
  saved state through `orbax_tree`, its `model.json`), with the module of
  the detected model built by the factory from a section of the spec."""

  def __init__(self, folder):
    from mimdistill.models import factory

    state, _ = restore_subtree(str(folder), ())
    self.spec = spec = ModelSpec.from_json(
      workdir_lib.read_json(folder, workdir_lib.MODEL)["model"]
    )
    self.variables = {"params": state["params"]}
    if "model_state" in state:
      self.variables["fixed"] = state["model_state"]["fixed"]
    section = dict(
      variant="custom",
      width=spec.width,
      depth=spec.depth,
      num_heads=spec.num_heads,
      patch_size=spec.patch_size,
      image_size=spec.image_size,
      in_chans=spec.in_chans,
      mlp_ratio=spec.mlp_ratio,
      pos_embed_type="learned" if spec.pos_embed == "learned" else "sincos",
    )
    if spec.layout == "classifier":
      section["global_pool"] = spec.pooling == "avg"
      self.module = factory.build("classifier", section, num_classes=spec.num_classes)
    elif spec.layout == "mae":
      dec = spec.decoder
      section["decoder"] = dict(width=dec.width, depth=dec.depth, num_heads=dec.num_heads)
      self.module = factory.build("mae", section)
    else:
      self.module = factory.build("encoder", dict(section, final_norm=spec.final_norm))

  def apply_variables(self):
    """What `module` takes: the encoder's subtrees alone for layout 'vit'."""
    if self.spec.layout != "vit":
      return self.variables
    return {c: tree["encoder"] for c, tree in self.variables.items()}


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = np.asarray(v)
  return out


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_round_trip(tmp_path, dtype):
  state = random_state(official_shapes("encoder", d=16, depth=1, image=8), dtype=dtype)
  pth = write_state_dict(tmp_path / "h.pth", state)
  report = convert(pth, tmp_path / "w", num_heads=2)
  assert report.spec.dtype == np.dtype(dtype).name
  convert(tmp_path / "w", tmp_path / "h.safetensors")
  assert_same_tensors(read_safetensors(tmp_path / "h.safetensors")[0], state)


def test_safetensors_files_are_standard(tmp_path):
  """The safetensors package (used by timm and transformers) reads our files,
  and we read its files."""
  st = pytest.importorskip("safetensors.numpy")
  state = random_state(official_shapes("finetune"))
  convert(write_state_dict(tmp_path / "f.pth", state), tmp_path / "ours.safetensors")
  assert_same_tensors(st.load_file(str(tmp_path / "ours.safetensors")), state, order=False)
  st.save_file(state, str(tmp_path / "theirs.safetensors"))
  report = convert(tmp_path / "theirs.safetensors", tmp_path / "w", num_heads=4)
  assert report.src_kind == "safetensors" and report.spec.num_classes == 5


# -----------------------------------------------------------------------------
# Detection and the report
# -----------------------------------------------------------------------------
def test_detection_of_a_vit_b_like_model():
  shapes = official_shapes("finetune", d=768, depth=3, p=16, image=224, classes=1000)
  spec = detect(shapes)
  assert (
    spec.layout,
    spec.width,
    spec.depth,
    spec.patch_size,
    spec.image_size,
    spec.in_chans,
    spec.mlp_ratio,
    spec.pooling,
    spec.num_classes,
    spec.final_norm,
    spec.pos_embed,
  ) == ("classifier", 768, 3, 16, 224, 3, 4.0, "avg", 1000, False, "learned")
  assert spec.num_heads == 12 and spec.assumed == ("num_heads",)
  assert "heads=12 (assumed)" in spec.describe()
  assert detect(shapes, num_heads=6).assumed == ()
  cls = detect(official_shapes("finetune_cls", d=384, depth=1, p=16, image=224))
  assert cls.pooling == "cls" and cls.final_norm and cls.num_heads == 6
  mae = detect(official_shapes("mae", d=1024, depth=2, p=16, image=224, dec=(512, 3)))
  assert mae.decoder.width == 512 and mae.decoder.depth == 3 and mae.decoder.num_heads == 16
  assert set(mae.assumed) == {"num_heads", "decoder.num_heads"}


def test_heads_assumed_note_and_override(tmp_path, capsys):
  state = random_state(official_shapes("encoder", d=192, depth=1, image=8))
  pth = write_state_dict(tmp_path / "t.pth", state)
  assert cli.main([str(pth), str(tmp_path / "w")]) == 0
  out = capsys.readouterr().out
  assert "heads=3 (assumed)" in out and "--num_heads" in out
  assert cli.main([str(pth), str(tmp_path / "w6"), "--num_heads=6"]) == 0
  out = capsys.readouterr().out
  assert "heads=6 " in out and "(assumed)" not in out and "\nnote " not in out
  assert ReadBack(tmp_path / "w6").spec.num_heads == 6


def test_bad_flags_are_refused_before_converting(tmp_path, capsys):
  pth = write_state_dict(
    tmp_path / "t.pth", random_state(official_shapes("encoder", d=192, depth=1, image=8))
  )
  assert cli.main([str(pth), str(tmp_path / "w"), "--out_indices=a,b"]) == 2
  assert "--out_indices=a,b must be block indices" in capsys.readouterr().err
  # The report's folder is checked first: a finished conversion was followed
  # by a traceback.
  bad = tmp_path / "missing" / "r.json"
  assert cli.main([str(pth), str(tmp_path / "w"), f"--report_json={bad}"]) == 2
  assert f"folder {bad.parent} does not exist" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()
  for flag, message in (
    ("--num_heads=0", "--num_heads=0 must be a positive integer"),
    ("--image_size=-16", "--image_size=-16 must be a positive integer"),
    ("--out_indices=0,1,2,3", "--out_indices does not apply here: .* is not a segmentor"),
  ):
    assert cli.main([str(pth), str(tmp_path / "w"), flag]) == 2
    assert re.search(message, capsys.readouterr().err), flag
  assert not (tmp_path / "w").exists()
  assert cli.main([str(pth), str(tmp_path / "w")]) == 0
  assert cli.main([str(tmp_path / "w"), str(tmp_path / "w.safetensors"), "--key=model"]) == 2
  assert "--key does not apply here" in capsys.readouterr().err


def test_unknown_heads_are_required_for_orbax_only(tmp_path, capsys):
  pth = write_state_dict(tmp_path / "odd.pth", random_state(official_shapes("encoder", d=40)))
  assert cli.main([str(pth), str(tmp_path / "w")]) == 2
  assert "--num_heads" in capsys.readouterr().err
  report = convert(pth, tmp_path / "odd.safetensors")  # names need no heads
  assert report.spec.num_heads is None and any("--num_heads" in n for n in report.notes)
  with pytest.raises(LayoutError, match="does not divide the width 40"):
    convert(pth, tmp_path / "w", num_heads=3)


def test_report_lists_skipped_and_missing(tmp_path):
  state = random_state(official_shapes("mae"))
  del state["pos_embed"], state["decoder_pos_embed"]  # fixed buffers some files drop
  pth = write_state_dict(
    tmp_path / "m.pth", state, extra={"optimizer": {"state": {}, "param_groups": []}, "epoch": 7}
  )
  report = convert(pth, tmp_path / "w", num_heads=4, decoder_num_heads=4, image_size=16)
  assert set(report.skipped) == {"optimizer", "epoch"}
  assert set(report.missing) == {"pos_embed", "decoder_pos_embed"}
  assert "sin-cos" in report.missing["pos_embed"]
  text = str(report)
  assert "optimizer: dict" in text and "pos_embed: computed" in text
  # The computed buffers are MAE's sin-cos tables and are exported.
  from mimdistill.models.pos_embed import sincos_2d

  convert(tmp_path / "w", tmp_path / "m.safetensors")
  got, _ = read_safetensors(tmp_path / "m.safetensors")
  np.testing.assert_array_equal(got["pos_embed"][0], sincos_2d(32, 4))
  np.testing.assert_array_equal(got["decoder_pos_embed"][0], sincos_2d(16, 4))

  # Without pos_embed and without --image_size, 224 is assumed and said so.
  r = convert(pth, tmp_path / "x.safetensors", num_heads=4, decoder_num_heads=4)
  assert r.spec.image_size == 224 and any("--image_size" in n for n in r.notes)


def test_layout_vit_keeps_only_the_encoder(tmp_path):
  state = random_state(official_shapes("mae"))
  report = convert(
    write_state_dict(tmp_path / "m.pth", state),
    tmp_path / "enc.safetensors",
    layout="vit",
    num_heads=4,
  )
  assert report.spec.layout == "vit" and report.spec.decoder is None
  assert "decoder_embed.weight" in report.skipped and "mask_token" in report.skipped
  got, _ = read_safetensors(tmp_path / "enc.safetensors")
  assert_same_tensors(
    got, {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
  )
  with pytest.raises(LayoutError, match="layout='classifier' was asked for"):
    convert(tmp_path / "m.pth", tmp_path / "x", layout="classifier", num_heads=4)


def test_ddp_prefix_and_state_dict_key(tmp_path):
  state = random_state(official_shapes("encoder"))
  pth = write_state_dict(
    tmp_path / "ddp.pth", {f"module.{k}": v for k, v in state.items()}, wrap="state_dict"
  )
  convert(pth, tmp_path / "e.safetensors")
  assert_same_tensors(read_safetensors(tmp_path / "e.safetensors")[0], state)


def test_workdir_of_a_stage_converts(tmp_path):
  """A training workdir: TrainState {step, params, model_state, opt_state,
  rng} with extra params (distillation heads) that no official model has."""
  import orbax.checkpoint as ocp

  state = random_state(official_shapes("encoder"))
  variables, _ = official_to_flax(state, "mae")
  variables["params"]["heads"] = {"proj": {"kernel": np.ones((32, 8), np.float32)}}
  train_state = {
    "step": np.int32(5),
    "params": variables["params"],
    "model_state": {"fixed": variables["fixed"]},
    "opt_state": {"mu": np.zeros(3)},
    "rng": np.zeros(2, np.uint32),
  }
  with ocp.CheckpointManager(
    tmp_path / "wd" / "checkpoints", options=ocp.CheckpointManagerOptions(create=True)
  ) as m:
    m.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state)))
    m.wait_until_finished()
  (tmp_path / "wd" / "config.json").write_text(
    json.dumps({"config": {}, "signature": {"model": {"num_heads": 2}}})
  )
  report = convert(tmp_path / "wd", tmp_path / "s.safetensors")
  assert report.src_kind == "workdir" and report.spec.num_heads == 2
  assert "params/heads" in report.skipped
  assert_same_tensors(read_safetensors(tmp_path / "s.safetensors")[0], state, order=False)
  # A step folder and a bare Orbax tree of variables are sources too.
  assert (
    convert(tmp_path / "wd" / "checkpoints" / "5", tmp_path / "t.safetensors", num_heads=2).src_kind
    == "orbax"
  )
  ocp.PyTreeCheckpointer().save(tmp_path / "bare", variables)
  convert(tmp_path / "bare", tmp_path / "u.safetensors")
  assert_same_tensors(read_safetensors(tmp_path / "u.safetensors")[0], state, order=False)


def test_converted_folder_is_a_teacher_source(tmp_path):
  """Stage 2 reads a converted folder like a stage-1 workdir."""
  from mimdistill.stages.distill import read_teacher_source

  state = random_state(official_shapes("mae"))
  convert(write_state_dict(tmp_path / "m.pth", state), tmp_path / "t", num_heads=4)
  variables, record = read_teacher_source(str(tmp_path / "t"))
  want, _ = official_to_flax(state, "vit")
  assert sorted(_flat(variables)) == sorted(_flat(want))
  for key, value in _flat(want).items():
    np.testing.assert_array_equal(_flat(variables)[key], value)
  assert record["kind"] == "workdir" and record["step"] == 0
  encoder, _ = restore_subtree(str(tmp_path / "t"), ("params", "encoder"))
  assert "blocks_1" in encoder
  model = json.loads((tmp_path / "t" / "model.json").read_text())
  assert model["model"]["layout"] == "mae" and model["model"]["num_heads"] == 4


# -----------------------------------------------------------------------------
# The shipped fixtures: every .pth converts and gives the fixture outputs
# -----------------------------------------------------------------------------
def _fixture(*parts):
  """A fixture of the ViT kinds (copied into tests/fixtures)."""
  return REPO.joinpath("tests", "fixtures", *parts)


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def test_fixture_finetune_logits_and_safetensors_round_trip(tmp_path, capsys):
  import jax

  folder = _fixture("finetune")
  args = json.loads((folder / "config.json").read_text())["model"]
  assert (
    cli.main([str(folder / "vit.pth"), str(tmp_path / "W"), f"--num_heads={args['num_heads']}"])
    == 0
  )
  out = capsys.readouterr().out
  assert "layout=classifier width=48 depth=3 heads=3 patch=4 image_size=32" in out
  assert "pooling=avg num_classes=10" in out
  loaded = ReadBack(tmp_path / "W")
  logits = jax.jit(loaded.module.apply)(
    loaded.apply_variables(), _nhwc(np.load(folder / "inputs.npz")["images"])
  )
  np.testing.assert_allclose(logits, np.load(folder / "expected.npz")["logits"], atol=1e-5)
  # Acceptance: `convert <official .pth> W` then `convert W out.safetensors`.
  assert cli.main([str(tmp_path / "W"), str(tmp_path / "out.safetensors")]) == 0
  got, _ = read_safetensors(tmp_path / "out.safetensors")
  assert_same_tensors(got, load_pth(folder / "vit.pth").tensors)


def test_fixture_mae_outputs(tmp_path):
  import jax

  folder = _fixture("mae")
  config = json.loads((folder / "config.json").read_text())
  args = config["model"]
  for name in ("mae_full.pth", "mae_training_style.pth"):
    report = convert(
      folder / name,
      tmp_path / name.removesuffix(".pth"),
      num_heads=args["num_heads"],
      decoder_num_heads=args["decoder_num_heads"],
    )
    assert report.spec.decoder.depth == args["decoder_depth"]
  assert set(report.skipped) == {"optimizer", "epoch", "scaler", "args"}
  loaded = ReadBack(tmp_path / "mae_training_style")
  inputs, expected = np.load(folder / "inputs.npz"), np.load(folder / "expected.npz")
  out = jax.jit(loaded.module.apply, static_argnums=3)(
    loaded.apply_variables(), _nhwc(inputs["images"]), inputs["noise"], config["mask_ratio"]
  )
  np.testing.assert_allclose(out.latent, expected["latent"], atol=1e-5)
  np.testing.assert_allclose(out.pred, expected["pred"], atol=1e-5)


def test_fixture_tinymim_relations(tmp_path):
  import jax
  import jax.numpy as jnp

  from mimdistill.models.vit import ViTEncoder
  from mimdistill.objectives.relations import relations

  folder = _fixture("tinymim")
  config = json.loads((folder / "config.json").read_text())
  images = jnp.asarray(_nhwc(np.load(folder / "inputs.npz")["images"]))
  expected = np.load(folder / "expected.npz")
  heads = config["teacher"]["num_heads"]
  for who, block in (
    ("teacher", config["teacher"]["intermediate"]),
    ("student", config["student_relation_block"]),
  ):
    report = convert(folder / f"{who}.pth", tmp_path / who, num_heads=config[who]["num_heads"])
    assert report.spec.layout == "vit" and report.spec.depth == config[who]["depth"]
    loaded = ReadBack(tmp_path / who)
    apply = functools.partial(
      loaded.module.apply, block=block, heads=heads, method=ViTEncoder.relation_qkv
    )
    qkv = jax.jit(apply)(loaded.apply_variables(), images)
    for name, logits in relations(qkv).items():  # the fixture holds softmaxes
      np.testing.assert_allclose(
        jax.nn.softmax(logits, axis=-1), expected[f"{who}_{name}"], atol=1e-5
      )


def test_every_fixture_pth_converts(tmp_path):
  """Every checkpoint of the ViT kinds' fixtures; the other families' own
  formats are tested with their kinds."""
  fixtures = _fixture()
  # Segmentors and the TinyMIM*-T backbone (test_segmentation_stage), CAE v2 and
  # CLIP (test_caev2, test_clip), SparK / CNNs (test_spark, test_cnn_timm): their own tests.
  other = (
    "untrusted",
    "segmentation",
    "seg_slide",
    "star_backbone",
    "caev2",
    "clip_visual",
    "spark",
    "sparse_resnet_eval",
    "cnn_layer_decay",
  )
  paths = sorted(p for p in fixtures.rglob("*.pth") if p.parent.name not in other)
  assert len(paths) >= 5
  for i, path in enumerate(paths):
    st = tmp_path / f"{i}.safetensors"
    convert(path, st, num_heads=4, decoder_num_heads=4)
    assert_same_tensors(read_safetensors(st)[0], load_pth(path).tensors)


# -----------------------------------------------------------------------------
# Bad inputs give clear errors
# -----------------------------------------------------------------------------
def test_untrusted_fixture_is_refused(tmp_path, monkeypatch, capsys):
  path = _fixture("untrusted", "untrusted.pth")
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UnsafeCheckpointError, match="NOT executed"):
    convert(path, tmp_path / "w")
  assert cli.main([str(path), str(tmp_path / "x.safetensors")]) == 2
  assert "not on this reader's allow-list" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == []  # no marker, no half-written output


def test_hostile_pickle_built_here_is_refused(tmp_path):
  state = {
    "cls_token": tensor(np.zeros((1, 1, 8), np.float32)),
    "evil": Evil("builtins", "exec", "open('pwned', 'w')"),
  }
  path = write_pth(tmp_path / "evil.pth", {"model": state})
  with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
    convert(path, tmp_path / "w")
  assert not (pathlib.Path.cwd() / "pwned").exists()


def test_truncated_and_corrupt_pth(tmp_path, capsys):
  pth = write_state_dict(tmp_path / "ok.pth", random_state(official_shapes("encoder")))
  data = pth.read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
  with pytest.raises(CorruptCheckpointError, match="truncated"):
    convert(tmp_path / "cut.pth", tmp_path / "w")
  (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
  assert cli.main([str(tmp_path / "junk.pth"), str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("convert: error:") and "not a zip archive" in err
  assert "Traceback" not in err
  assert not (tmp_path / "w").exists()


def test_truncated_and_corrupt_safetensors(tmp_path):
  state = random_state(official_shapes("encoder"))
  convert(write_state_dict(tmp_path / "e.pth", state), tmp_path / "e.safetensors")
  data = (tmp_path / "e.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:-100])
  with pytest.raises(SafetensorsError, match="truncated"):
    convert(tmp_path / "cut.safetensors", tmp_path / "w")
  (tmp_path / "short.safetensors").write_bytes(data[:5])
  with pytest.raises(SafetensorsError, match="too short"):
    read_safetensors(tmp_path / "short.safetensors")
  bad = bytearray(data)
  bad[9:14] = b"\xff\xfe{{{"
  (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
  with pytest.raises(SafetensorsError, match="header is corrupt"):
    read_safetensors(tmp_path / "bad.safetensors")
  assert isinstance(SafetensorsError("x"), CheckpointReadError)


def test_not_a_vit_and_incomplete_and_unknown_tensors(tmp_path):
  other = write_state_dict(
    tmp_path / "resnet.pth",
    {
      "conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
      "fc.weight": np.zeros((10, 8), np.float32),
    },
  )
  with pytest.raises(LayoutError, match="not a ViT state dict"):
    convert(other, tmp_path / "w")

  state = random_state(official_shapes("encoder", depth=3))
  gap = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
  with pytest.raises(LayoutError, match=r"blocks \[1\] missing"):
    convert(write_state_dict(tmp_path / "gap.pth", gap), tmp_path / "w")
  part = {k: v for k, v in state.items() if k != "blocks.2.mlp.fc2.bias"}
  with pytest.raises(LayoutError, match="blocks.2.mlp.fc2.bias"):
    convert(write_state_dict(tmp_path / "part.pth", part), tmp_path / "w", num_heads=4)
  wrong = dict(state, **{"blocks.0.attn.proj.weight": np.zeros((32, 31), np.float32)})
  with pytest.raises(LayoutError, match=r"blocks.0.attn.proj.weight is \(32, 31\)"):
    convert(write_state_dict(tmp_path / "wrong.pth", wrong), tmp_path / "w", num_heads=4)

  # Layer scale is part of the model now: in some blocks only, the others lack it.
  scaled = dict(state, **{"blocks.0.ls1.gamma": np.ones(32, np.float32)})
  with pytest.raises(LayoutError, match="blocks.1.gamma_1"):
    convert(write_state_dict(tmp_path / "ls.pth", scaled), tmp_path / "w", num_heads=4)
  # Register tokens change every output: refused even with --allow_unknown.
  registers = dict(state, reg_token=np.ones((1, 4, 32), np.float32))
  path = write_state_dict(tmp_path / "reg.pth", registers)
  with pytest.raises(LayoutError, match="register tokens"):
    convert(path, tmp_path / "w", num_heads=4, allow_unknown=True)
  qk = dict(state, **{"blocks.0.attn.q_norm.weight": np.ones(8, np.float32)})
  path = write_state_dict(tmp_path / "qk.pth", qk)
  with pytest.raises(LayoutError, match="qk-norm.*--allow_unknown"):
    convert(path, tmp_path / "w", num_heads=4)
  report = convert(path, tmp_path / "w", num_heads=4, allow_unknown=True)
  assert "qk-norm" in report.skipped["blocks.0.attn.q_norm.weight"]
  with pytest.raises(LayoutError, match="image_size=32 was asked for.*16x16"):
    convert(path, tmp_path / "w2", num_heads=4, image_size=32, allow_unknown=True)


def test_destination_rules(tmp_path):
  pth = write_state_dict(tmp_path / "e.pth", random_state(official_shapes("encoder")))
  convert(pth, tmp_path / "w", num_heads=4)
  with pytest.raises(FileExistsError, match="--overwrite"):
    convert(pth, tmp_path / "w", num_heads=4)
  convert(pth, tmp_path / "w", num_heads=2, overwrite=True)
  assert ReadBack(tmp_path / "w").spec.num_heads == 2
  # overriding the heads a workdir records is said (it was silent)
  report = convert(tmp_path / "w", tmp_path / "w4.safetensors", num_heads=4)
  assert any("--num_heads=4 overrides the 2 heads recorded" in n for n in report.notes)
  assert not convert(tmp_path / "w", tmp_path / "w2.safetensors", num_heads=2).notes
  assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
  with pytest.raises(CheckpointReadError, match="no checkpoint at"):
    convert(tmp_path / "nope.pth", tmp_path / "x")
  (tmp_path / "plain").mkdir()
  with pytest.raises(CheckpointReadError, match="neither a mimdistill workdir"):
    convert(tmp_path / "plain", tmp_path / "y")
  # SRC and DST may not overlap: --overwrite of the source, or of a folder
  # holding it, deleted the checkpoint being converted.
  before = sorted(p.name for p in (tmp_path / "w").rglob("*"))
  for dst, match in (
    (tmp_path / "w", "is the source"),
    (tmp_path / "w" / "inner", "is inside the source"),
    (tmp_path, "holds the source .*would delete"),
  ):
    with pytest.raises(ValueError, match=match):
      convert(tmp_path / "w", dst, overwrite=True)
  assert sorted(p.name for p in (tmp_path / "w").rglob("*")) == before
  with pytest.raises(ValueError, match="is the source"):
    convert(pth, tmp_path / "e.pth", overwrite=True)
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="is under the file .*notes.txt"):
    convert(pth, tmp_path / "notes.txt" / "w")
  # --overwrite deleted any folder: a training workdir, a pipeline folder
  run = tmp_path / "run"
  (run / "checkpoints" / "780").mkdir(parents=True)
  (run / "metrics.jsonl").write_text("{}")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "thesis.tex").write_text("x")
  for dst, what in ((run, "a training workdir"), (tmp_path / "mine", "it holds thesis.tex")):
    with pytest.raises(FileExistsError, match=f"is not a folder this command wrote \\({what}\\)"):
      convert(pth, dst, num_heads=4, overwrite=True)
  assert (run / "checkpoints" / "780").is_dir() and (tmp_path / "mine" / "thesis.tex").exists()
  (tmp_path / "empty").mkdir()
  convert(pth, tmp_path / "empty", num_heads=4, overwrite=True)  # an empty folder is fine


# -----------------------------------------------------------------------------
# PyTorch loads the export with strict=True (only where torch is installed)
# -----------------------------------------------------------------------------
TORCH_CHECK = textwrap.dedent('''
    """Official-style modules (timm 0.3.2 Block, MAE models_vit / models_mae
    names; fixed sin-cos buffers are requires_grad=False Parameters)."""
    import json, sys
    import numpy as np
    import torch
    from torch import nn
    from safetensors.torch import load_file

    class Mlp(nn.Module):
        def __init__(s, d, h):
            super().__init__(); s.fc1 = nn.Linear(d, h); s.act = nn.GELU(); s.fc2 = nn.Linear(h, d)
        def forward(s, x): return s.fc2(s.act(s.fc1(x)))

    class Attention(nn.Module):
        def __init__(s, d, heads):
            super().__init__(); s.h = heads; s.qkv = nn.Linear(d, 3 * d); s.proj = nn.Linear(d, d)
        def forward(s, x):
            b, n, d = x.shape
            qkv = s.qkv(x).reshape(b, n, 3, s.h, d // s.h).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            a = ((q @ k.transpose(-2, -1)) * (d // s.h) ** -0.5).softmax(-1)
            return s.proj((a @ v).transpose(1, 2).reshape(b, n, d))

    class Block(nn.Module):
        def __init__(s, d, heads, ratio):
            super().__init__()
            s.norm1 = nn.LayerNorm(d, eps=1e-6); s.attn = Attention(d, heads)
            s.norm2 = nn.LayerNorm(d, eps=1e-6); s.mlp = Mlp(d, int(d * ratio))
        def forward(s, x):
            x = x + s.attn(s.norm1(x)); return x + s.mlp(s.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(s, p, c, d):
            super().__init__(); s.proj = nn.Conv2d(c, d, p, p)
        def forward(s, x): return s.proj(x).flatten(2).transpose(1, 2)

    class ViT(nn.Module):
        def __init__(s, m):
            super().__init__()
            d, n = m["width"], (m["image_size"] // m["patch_size"]) ** 2
            s.layout, s.pooling = m["layout"], m["pooling"]
            s.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            s.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d), requires_grad=m["pos_embed"] == "learned")
            s.patch_embed = PatchEmbed(m["patch_size"], m["in_chans"], d)
            s.blocks = nn.ModuleList([Block(d, m["num_heads"], m["mlp_ratio"]) for _ in range(m["depth"])])
            if m["final_norm"]:
                s.norm = nn.LayerNorm(d, eps=1e-6)
            if m["decoder"]:
                dd = m["decoder"]
                s.mask_token = nn.Parameter(torch.zeros(1, 1, dd["width"]))
                s.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dd["width"]), requires_grad=False)
                s.decoder_embed = nn.Linear(d, dd["width"])
                s.decoder_blocks = nn.ModuleList([Block(dd["width"], dd["num_heads"], m["mlp_ratio"]) for _ in range(dd["depth"])])
                s.decoder_norm = nn.LayerNorm(dd["width"], eps=1e-6)
                s.decoder_pred = nn.Linear(dd["width"], dd["out_dim"])
            if m["layout"] == "classifier":
                if m["pooling"] == "avg":
                    s.fc_norm = nn.LayerNorm(d, eps=1e-6)
                s.head = nn.Linear(d, m["num_classes"])
        def forward(s, x):  # models_vit.VisionTransformer.forward
            x = s.patch_embed(x)
            cls = s.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x), dim=1) + s.pos_embed
            for blk in s.blocks:
                x = blk(x)
            x = s.fc_norm(x[:, 1:].mean(dim=1)) if s.pooling == "avg" else s.norm(x)[:, 0]
            return s.head(x)

    for path, expect in zip(sys.argv[1::2], sys.argv[2::2]):
        state = load_file(path)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            m = json.loads(f.metadata()["mimdistill.model"])
        model = ViT(m)
        result = model.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        if expect != "-":
            data = np.load(expect)
            with torch.no_grad():
                logits = model(torch.from_numpy(data["images"])).numpy()
            ref = np.load(expect.replace("inputs.npz", "expected.npz"))["logits"]
            assert np.abs(logits - ref).max() < 1e-5, np.abs(logits - ref).max()
    print("strict ok", len(sys.argv[1:]) // 2)
''')


def test_torch_loads_exports_strictly(tmp_path):
  """A torch module with the official names loads every export with
  strict=True, and the fine-tuned fixture's logits come out of it. Run in a
  child process: this test session must stay torch-free (test_parity checks)."""
  try:
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None:
      pytest.skip("torch or safetensors is not installed")
  except ValueError:
    pytest.skip("torch is not importable")
  args = []
  for kind in ("encoder", "mae", "finetune", "finetune_cls"):
    state = random_state(official_shapes(kind))
    pth = write_state_dict(tmp_path / f"{kind}.pth", state)
    convert(pth, tmp_path / kind, num_heads=4, decoder_num_heads=4)
    convert(tmp_path / kind, tmp_path / f"{kind}.safetensors")
    args += [str(tmp_path / f"{kind}.safetensors"), "-"]
  fixtures = REPO.parent / "shared" / "fixtures" / "finetune"
  if (fixtures / "vit.pth").exists():
    convert(fixtures / "vit.pth", tmp_path / "ft", num_heads=3)
    convert(tmp_path / "ft", tmp_path / "ft.safetensors")
    args += [str(tmp_path / "ft.safetensors"), str(fixtures / "inputs.npz")]
  result = subprocess.run(
    [sys.executable, "-c", TORCH_CHECK, *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["strict", "ok", str(len(args) // 2)]


def test_converted_student_fine_tunes_with_stage_3(tfds_dir, tmp_path, monkeypatch):
  """A converted TinyMIM-style student (distilled with other heads) is a
  stage-3 init: `--config.init.source=<converted folder>`."""
  # tensorboardX imports torch when it can; this session must stay torch-free
  # (test_parity checks that nothing here needs torch).
  monkeypatch.setitem(sys.modules, "torch", None)
  sys.path.insert(0, str(REPO))
  from configs import finetune as finetune_configs
  from mimdistill.stages import finetune

  state = random_state(official_shapes("encoder", d=32, depth=1, p=8, image=32))
  convert(write_state_dict(tmp_path / "student.pth", state), tmp_path / "student", num_heads=4)
  c = finetune_configs.get_config("quickstart")
  c.model.update(width=32, depth=1, num_heads=2, patch_size=8, image_size=32)
  c.init.source = str(tmp_path / "student")
  c.data.update(data_dir=str(tfds_dir), eval_split="test[:16]")
  c.update(
    batch_size=16,
    eval_batch_size=16,
    total_steps=1,
    log_every=1,
    checkpoint_every=1,
    async_checkpoints=False,
  )
  summary = finetune.run(c, tmp_path / "ft")
  assert summary["parent"]["path"].endswith("student/checkpoints/0")
  # Its best/ (here the last step, 1) and that step's folder export like the
  # workdir (best/ was "neither a mimdistill workdir", best/1 a traceback).
  from safetensors.numpy import load_file

  convert(tmp_path / "ft", tmp_path / "last.safetensors")
  want = load_file(tmp_path / "last.safetensors")
  for src in (tmp_path / "ft" / "best", tmp_path / "ft" / "best" / "1"):
    report = convert(src, tmp_path / "best.safetensors", overwrite=True)
    got = load_file(tmp_path / "best.safetensors")
    assert report.spec.num_heads == 2 and sorted(got) == sorted(want)  # heads from config.json
    for name in want:
      np.testing.assert_array_equal(got[name], want[name])
  # Step 1 moved the weights only a little: they started from the student's.
  qkv, _ = restore_subtree(str(tmp_path / "ft"), ("params", "encoder", "blocks_0", "attn", "qkv"))
  np.testing.assert_allclose(qkv["kernel"], state["blocks.0.attn.qkv.weight"].T, atol=0.05)
