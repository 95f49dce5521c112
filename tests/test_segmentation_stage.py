"""Stage 4 (segmentation): a 3-step run from a tiny distill-layout workdir
on 8 devices (eval over a split that is not a multiple of the batch counts
every pixel once; best checkpoint, per-class table, picture, lineage), the
same 3 steps of the stage's task through `loop.prepare` on 1 device give
the same params and BatchNorm statistics, the padded evaluator against
mmseg's per-image slide inference, the clear errors, the pipeline wiring
(segmentation a sibling of fine-tuning) and the mmseg checkpoint round
trip through `mimdistill.convert`."""

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, TINY_RUN

from mimdistill.data import embedded_segmentation, input_pipeline, sources
from mimdistill.data import segmentation_transforms as st
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.models.resize import linear_taps
from mimdistill.models.vit import ViTEncoder
from mimdistill.stages import segment
from mimdistill.training import loop as loop_lib
from mimdistill.training import segmentation_evaluate as se
from mimdistill.training import segmentation_inference as si
from mimdistill.training import sharding as shard_lib

sys.path.insert(0, str(REPO))
from configs import pipeline as pipeline_configs  # noqa: E402
from configs import segment as segment_configs  # noqa: E402

ENCODER = dict(width=32, depth=4, num_heads=2, patch_size=4, image_size=32)
FIXTURES = REPO / "tests" / "fixtures" / "segmentation"


def write_encoder_workdir(path) -> None:
  """What a distill workdir holds for the next stage: `state/params/
  encoder` and the fixed sin-cos `model_state/fixed/encoder/pos_embed`."""
  enc = ViTEncoder(**ENCODER)
  v = jax.eval_shape(enc.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype) * 0.05, v)
  state = {"params": {"encoder": v["params"]}, "model_state": {"fixed": {"encoder": v["fixed"]}}}
  with ocp.CheckpointManager(
    path / "checkpoints",
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    item_handlers={"state": ocp.PyTreeCheckpointHandler()},
  ) as manager:
    manager.save(4, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))


def tiny_config(tfds_dir, source, **overrides):
  c = segment_configs.get_config("quickstart")
  c.model.update(**ENCODER)
  c.model.decode_head.update(channels=16, pool_scales=(1, 2))  # a smaller program to compile
  c.model.auxiliary_head.channels = 8
  c.init.source = str(source)
  c.data.data_dir = str(tfds_dir)
  c.update(**TINY_RUN)
  c.update(warmup_steps=1, eval_batch_size=48)
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
  """The embedded scenes at test size, in a data dir of their own: 48
  training scenes, 100 test scenes (not a multiple of the eval batch 48)."""
  data_dir = tmp_path_factory.mktemp("seg_tfds")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(embedded_segmentation, "SPLIT_SIZES", {"train": 48, "test": 100})
    sources.get_builder("embedded_segmentation", str(data_dir)).prepare()
  return data_dir


@pytest.fixture(scope="module")
def stage_run(seg_data, tmp_path_factory, caplog_module):
  root = tmp_path_factory.mktemp("seg_stage")
  write_encoder_workdir(root / "distill")
  config = tiny_config(seg_data, root / "distill")
  summary = segment.run(config, root / "segment")
  return config, root, summary


@pytest.fixture(scope="module")
def caplog_module():
  import logging

  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler = Keep()
  logger = logging.getLogger("mimdistill")
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  yield records
  logger.removeHandler(handler)
  logger.setLevel(level)


def test_stage_runs_from_a_distill_workdir(stage_run, caplog_module):
  config, root, summary = stage_run
  w = root / "segment"
  assert jax.device_count() == 8  # the run's mesh: all 8 fake devices
  assert summary["steps"] == 3 and summary["mIoU"] is not None
  final = json.loads((w / "final_metrics.json").read_text())
  # 100 test scenes in batches of 48 (the last padded with 44 empty ones):
  # every pixel of every scene counted once.
  assert final["eval_count"] == 100
  assert final["eval_labelled_pixels"] == 100 * 64 * 64
  assert (w / "best").is_dir() and summary["best_step"] == 3
  table = json.loads((w / "per_class_iou.json").read_text())
  assert [r["class"] for r in table["classes"]][:2] == ["background", "circle"]
  assert len(table["classes"]) == 11 and abs(table["mIoU"] - round(summary["mIoU"], 2)) < 1e-6
  assert "mIoU / mAcc" in (w / "per_class_iou.txt").read_text()
  assert (w / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  evals = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  assert any(r["prefix"] == "eval" and "mIoU" in r for r in evals)
  parent = json.loads((w / "lineage.json").read_text())["parent"]
  assert parent["path"] == str(root / "distill" / "checkpoints" / "4")
  assert any("relative_position_bias_table" in r and "zero-initialised" in r for r in caplog_module)
  assert any("decode_head newly initialised" in r for r in caplog_module)
  # best/ is a whole-segmentor source too (it was read as an encoder workdir and refused)
  from mimdistill.stages import sources as stage_sources

  whole = stage_sources.read_segmentor(str(w / "best"))
  assert whole.record["kind"] == "best" and whole.record["step"] == 3
  last, _ = restore_subtree(str(w), ("params",))
  jax.tree_util.tree_map(np.testing.assert_array_equal, whole.params, last)
  # ... and exports as one (it was read as a ViT encoder and refused)
  from mimdistill.interop.conversion import read_safetensors
  from mimdistill.interop.segmentation_conversion import convert as convert_segmentor

  out = root / "exported"
  out.mkdir(exist_ok=True)
  convert_segmentor(w / "best", out / "best.safetensors")  # out_indices from W/config.json
  convert_segmentor(w, out / "last.safetensors")
  best, _ = read_safetensors(out / "best.safetensors")
  want, _ = read_safetensors(out / "last.safetensors")
  assert sorted(best) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(best[name], want[name])


def test_one_device_gives_the_same_params_and_statistics(stage_run):
  """The stage's task through `loop.prepare` on 1 device, on the batches
  the 8-device run trained on, ends where that run did."""
  config, root, _ = stage_run
  data = input_pipeline.make_dataset(
    segment.run_config.data_config(config, "segment"),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
  )
  it = iter(data)
  batches = [next(it) for _ in range(3)]
  it.close()
  model = segment.build_model(config)
  pretrained, _, _ = segment.init_from_source(model, config)
  task = segment.build_task(config, model, data.steps_per_epoch, pretrained=pretrained)
  mesh = shard_lib.make_mesh(num_devices=1)
  prep = loop_lib.prepare(task, mesh, jax.random.PRNGKey(config.seed))
  state = prep.init_state()
  for batch in batches:
    state, _ = prep.update(state, prep.place_batch(batch), prep.inputs)
  one = jax.device_get({"params": state.params, "batch_stats": state.model_state["batch_stats"]})
  w = root / "segment"
  eight = {
    "params": restore_subtree(str(w), ("params",))[0],
    "batch_stats": restore_subtree(str(w), ("model_state", "batch_stats"))[0],
  }
  flat = dict(jax.tree_util.tree_flatten_with_path(eight)[0])
  for path, a in jax.tree_util.tree_flatten_with_path(one)[0]:
    np.testing.assert_allclose(a, flat[path], rtol=1e-4, atol=2e-5, err_msg=str(path))
  assert int(one["batch_stats"]["decode_head"]["bottleneck"]["bn"]["num_batches_tracked"]) == 3


def _logits_fn(w):
  def fn(x):  # position-dependent, so a wrong transpose or window shows
    y = jnp.einsum("bhwc,ck->bhwk", x, w)
    return y + 0.3 * jnp.cumsum(x[..., :1], axis=1) - 0.2 * jnp.cumsum(x[..., 1:2], axis=2)

  return fn


def _reference(fn, image, crop, stride, ori):
  """mmseg's slide inference of one image in numpy: its windows
  (`slide_windows`, checked against the official ones by the seg_slide
  parity kind), summed and divided by the overlap count, then torch's
  bilinear taps (width first) to the original size."""
  h, w = image.shape[:2]
  windows = si.slide_windows(h, w, (crop, crop), stride)
  crops = np.stack([image[y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
  logits = np.asarray(fn(jnp.asarray(crops)), np.float32)
  total = np.zeros((h, w, logits.shape[-1]), np.float32)
  for (y1, y2, x1, x2), lg in zip(windows, logits, strict=True):
    total[y1:y2, x1:x2] += lg
  x = total / si.count_matrix(h, w, windows)[..., None]
  for axis, size in ((1, ori[1]), (0, ori[0])):
    i0, i1, w1 = linear_taps(x.shape[axis], size)
    shape = [1, 1, 1]
    shape[axis] = size
    w1 = w1.reshape(shape)
    x = (1 - w1) * np.take(x, i0, axis=axis) + w1 * np.take(x, i1, axis=axis)
  return x


def test_padded_evaluation_matches_per_image_slide_inference():
  """Landscape, portrait (stored transposed), crop-sized and
  smaller-than-canvas images in one padded batch: logits at the original
  size equal mmseg's per-image slide inference + resize."""
  k, crop, stride = 5, 16, (11, 7)
  rng = np.random.default_rng(0)
  fn = jax.jit(_logits_fn(jnp.asarray(rng.normal(size=(3, k)).astype(np.float32))))
  sizes = [((20, 37), (30, 50)), ((37, 20), (50, 25)), ((16, 16), (16, 16)), ((29, 16), (60, 33))]
  canvas, label_canvas = (20, 40), (33, 60)
  batch, images = {k: [] for k in ("image", "img_shape", "ori_shape", "transposed")}, []
  for (h, w), ori in sizes:
    img = rng.normal(size=(h, w, 3)).astype(np.float32)
    images.append(img)
    stored = img.transpose(1, 0, 2) if h > w else img
    batch["image"].append(st.pad_to(stored, None, canvas)[0])
    batch["img_shape"].append([h, w])
    batch["ori_shape"].append(list(ori))
    batch["transposed"].append(int(h > w))
  batch = {k: jnp.asarray(np.asarray(v)) for k, v in batch.items()}
  batch["label"] = jnp.full((len(sizes),) + label_canvas, 255, jnp.int32)
  windows = se.max_windows(canvas, crop, stride, "slide")
  got = jax.jit(
    lambda b: se.original_size_logits(fn, b, crop=crop, stride=stride, windows=windows)
  )(batch)
  for n, ((h, w), (oh, ow)) in enumerate(sizes):
    mine = np.asarray(got[n])
    mine = mine[:ow, :oh].transpose(1, 0, 2) if h > w else mine[:oh, :ow]
    ref = _reference(fn, images[n], crop, stride, (oh, ow))
    np.testing.assert_allclose(mine, ref, atol=2e-5, err_msg=str((h, w)))


def test_clear_errors(seg_data, tmp_path):
  src = tmp_path / "none"
  src.mkdir()  # exists: validate checks init.source before the dataset's fields
  odd = {"data.image_size": 36, "model.image_size": 36, "model.patch_size": 8}
  with pytest.raises(ValueError, match="crop size 36 is not a multiple of the patch size 8"):
    segment.validate(_with(tiny_config(seg_data, src), odd), data=False)
  with pytest.raises(ValueError, match="beyond the backbone's depth 4"):
    segment.validate(_with(tiny_config(seg_data, src), {"model.out_indices": (0, 1, 2, 4)}))
  with pytest.raises(ValueError, match="no per-pixel 'annotation'"):
    segment.validate(_with(tiny_config(seg_data, src), {"data.name": "embedded"}))
  # A label >= num_classes (other than 255), through the pipeline's map step.
  builder = sources.get_builder("embedded_segmentation", str(seg_data))
  record = sources.open_split(builder, "test")[0]
  c = tiny_config(seg_data, src, num_classes=3)
  prep = st.preprocess_from_config(segment.run_config.data_config(c, "segment"), train=True, seed=0)
  with pytest.raises(ValueError, match=r"label values \[.*\] >= num_classes=3"):
    prep(0, record)
  # Image / annotation folders: unpaired files named, unknown layouts shown.
  root = tmp_path / "ade"
  for sub, name in (("images/training", "a.jpg"), ("images/training", "b.jpg")):
    (root / sub).mkdir(parents=True, exist_ok=True)
    (root / sub / name).write_bytes(b"")
  (root / "annotations" / "training").mkdir(parents=True)
  (root / "annotations" / "training" / "a.png").write_bytes(b"")
  with pytest.raises(ValueError, match=r"images without an annotation .*\['b.jpg'\]"):
    sources.get_builder(f"ade20k:{root}", str(tmp_path / "tfds"))
  (tmp_path / "odd" / "pictures").mkdir(parents=True)
  with pytest.raises(ValueError, match="expected root/images/<split>/.*annotations"):
    sources.get_builder(f"ade20k:{tmp_path / 'odd'}", str(tmp_path / "tfds"))


def _with(config, dotted: dict):
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_pipeline_runs_segmentation_as_a_sibling_of_finetuning(tmp_path, monkeypatch, capsys):
  from mimdistill.stages import pipeline, registry

  seen = {}

  def fake_run(cfg, stage_dir):
    source = cfg.teacher.source if cfg.stage == "distill" else cfg.get("init", {}).get("source")
    seen[stage_dir.name] = source
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "lineage.json").write_text(json.dumps({"parent": {"path": source}}))
    return {"mIoU": 12.5, "mAcc": 20.0, "aAcc": 70.0} if cfg.stage == "segment" else {}

  monkeypatch.setattr(registry, "run_stage", fake_run)
  config = pipeline_configs.get_config("quickstart")
  assert config.stages == "pretrain,distill,finetune,segment"
  summary = pipeline.run_pipeline(config, tmp_path / "w")
  assert seen["finetune"] == seen["segment"] == str(tmp_path / "w" / "distill")
  assert summary["stages"][-1]["lineage"]["parent"]["path"] == seen["finetune"]
  out = capsys.readouterr().out
  assert "mIoU=12.50" in out and '"final_mIoU": 12.5' in out
  seen.clear()
  pipeline.run_pipeline(pipeline_configs.get_config("mae_baseline:quickstart"), tmp_path / "m")
  assert seen["segment"] == str(tmp_path / "m" / "pretrain")
  seen.clear()
  pipeline.run_pipeline(pipeline_configs.get_config("scratch_baseline:quickstart"), tmp_path / "s")
  assert seen == {"finetune": "", "segment": ""}
  config = pipeline_configs.get_config("quickstart")
  config.segment.parent = "finetune_x"
  with pytest.raises(ValueError, match="names parent 'finetune_x'"):
    pipeline.run_pipeline(config, tmp_path / "x")


def test_mmseg_checkpoint_with_out_indices_past_its_depth_is_refused(tmp_path, capsys):
  if not FIXTURES.is_dir():
    pytest.skip(f"{FIXTURES} is absent")
  from mimdistill import convert

  # Was written, and refused only when a segmentation run first built it.
  assert (
    convert.main([str(FIXTURES / "seg_model.pth"), str(tmp_path / "w"), "--out_indices=0,1,2,99"])
    == 2
  )
  assert "block index 99 is beyond the backbone's depth 4" in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_mmseg_checkpoint_converts_to_a_workdir_and_back(tmp_path):
  if not FIXTURES.is_dir():
    pytest.skip(f"{FIXTURES} is absent")
  from mimdistill import convert
  from mimdistill.interop.conversion import read_safetensors
  from mimdistill.interop.pth_reader import load_pth, read_pickle_tree
  from mimdistill.models import factory
  from mimdistill.stages.sources import read_segmentor

  pth = FIXTURES / "seg_model.pth"
  config = json.loads((FIXTURES / "config.json").read_text())
  indices = ",".join(str(i) for i in config["segmentor"]["backbone"]["out_indices"])
  assert convert.main([str(pth), str(tmp_path / "w"), f"--out_indices={indices}"]) == 0
  assert convert.main([str(tmp_path / "w"), str(tmp_path / "back.safetensors")]) == 0
  original = load_pth(pth).tensors
  back, metadata = read_safetensors(tmp_path / "back.safetensors")
  assert list(back) == list(original)
  for name, value in original.items():
    assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  # A .pth destination is an mmcv checkpoint (it was an Orbax folder named back.pth).
  assert convert.main([str(tmp_path / "w"), str(tmp_path / "back.pth")]) == 0
  assert (tmp_path / "back.pth").is_file()
  tree = read_pickle_tree(tmp_path / "back.pth")
  assert sorted(tree) == ["meta", "state_dict"]
  assert json.loads(tree["meta"]["mimdistill.segmentor"]) == json.loads(
    metadata["mimdistill.segmentor"]
  )
  again = load_pth(tmp_path / "back.pth").tensors
  assert list(again) == list(original)
  for name, value in original.items():
    assert again[name].dtype == value.dtype and np.array_equal(again[name], value), name
  # The converted workdir reproduces the official eval logits.
  section = json.loads((tmp_path / "w" / "model.json").read_text())["model"]
  assert json.loads(metadata["mimdistill.segmentor"]) == section
  model = factory.build("segmentor", section)
  whole = read_segmentor(str(tmp_path / "w"))
  variables = {"params": whole.params, "batch_stats": whole.batch_stats}
  images = jnp.asarray(np.load(FIXTURES / "inputs.npz")["images"].transpose(0, 2, 3, 1))
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_decode))(variables, images)
  expected = np.load(FIXTURES / "expected.npz")["eval/seg_logits"].transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
  # ... and is a whole-segmentor init.source (another class count: conv_seg new).
  c = segment_configs.get_config("ade20k_b")
  c.model.update({k: section[k] for k in ("width", "depth", "num_heads", "patch_size")})
  c.model.update(image_size=section["image_size"], out_indices=tuple(section["out_indices"]))
  c.model.decode_head.channels = section["decode_head"]["channels"]
  c.model.auxiliary_head.channels = section["auxiliary_head"]["channels"]
  c.update(num_classes=7)
  c.init.source = str(tmp_path / "w")
  params, state, record = segment.init_from_source(segment.build_model(c), c)
  assert "conv_seg" not in params["decode_head"] and "bottleneck" in params["decode_head"]
  assert state["batch_stats"]["backbone"]["fpn1_1"]["running_var"].shape == (32,)
  assert record["path"] == str(tmp_path / "w" / "checkpoints" / "0")
  shutil.rmtree(tmp_path / "w")
