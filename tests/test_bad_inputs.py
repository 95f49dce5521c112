"""Bad input is refused early in one line, or handled correctly; no run loses
finished work (mimdistill issue 13, one test per point)."""

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, set_path
from PIL import Image

from mimdistill import workdir as workdir_lib
from mimdistill.data import class_folder, sources
from mimdistill.stages import distill, finetune, pipeline, pretrain
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib
from mimdistill.training.state import TrainState
from mimdistill.workdir_lock import WorkdirBusyError, WorkdirLock

sys.path.insert(0, str(REPO))
from configs import finetune as finetune_configs  # noqa: E402
from configs import mae_pretrain, tinymim_distill  # noqa: E402
from configs import pipeline as pipeline_configs  # noqa: E402


def _config(module, arg="quickstart", **overrides):
  c = module.get_config(arg)
  for key, value in overrides.items():
    set_path(c, key, value)
  return c


# -- 1 and 7: numeric settings, checked before anything is read or compiled --
@pytest.mark.parametrize(
  "override,message",
  [
    ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be an integer >= 1"),
    ({"lr": -1e-3}, "lr=-0.001 must be a finite number > 0"),
    ({"lr": float("nan")}, "lr=nan must be a finite number"),
    ({"base_lr": 0.0}, "base_lr=0.0 must be a finite number > 0"),
    ({"min_lr": 1.0}, "min_lr=1 is above the peak lr"),
    ({"mask_ratio": 0.999}, "mask_ratio=0.999 leaves no visible patch of 64"),
    ({"log_every": 0}, "log_every=0 must be an integer >= 1"),
    ({"checkpoint_every": -5}, "checkpoint_every=-5 must be an integer >= 1"),
    ({"optimizer.accumulate_steps": 0}, "accumulate_steps=0"),
  ],
)
def test_numeric_settings_are_refused_before_compiling(override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    pretrain.validate(_config(mae_pretrain, **override), data=False)


# Each of these used to start a run (or fail inside the input workers): Adam
# with b2 = 1 divides by zero, a drop path of 1.5 or an EMA decay of 1.5 are
# not probabilities, a warmup as long as the run never reaches the peak lr.
@pytest.mark.parametrize(
  "override,message",
  [
    ({"model.drop_path": 1.5}, "drop_path=1.5 must be in [0, 1)"),
    ({"model.mlp_ratio": 0.0}, "mlp_ratio=0.0 must be a number > 0"),
    ({"optimizer.b2": 1.0}, "optimizer.b2=1.0 must be in [0, 1)"),
    ({"optimizer.b1": -0.1}, "optimizer.b1=-0.1 must be in [0, 1)"),
    ({"optimizer.layer_decay": 0.0}, "optimizer.layer_decay=0.0 must be in (0, 1]"),
    ({"optimizer.layer_decay": 1.5}, "optimizer.layer_decay=1.5 must be in (0, 1]"),
    ({"ema_decay": 1.5}, "ema_decay=1.5 must be in [0, 1)"),
    ({"eval_batch_size": 0}, "eval_batch_size=0 must be an integer >= 1"),
    ({"warmup_epochs": 100.0}, "warmup_epochs=100 is not shorter than total_epochs=20"),
    ({"data.reprob": 1.5}, "data.reprob=1.5 must be in [0, 1]"),
    ({"data.remode": "bogus"}, "data.remode='bogus' is not one of"),
    ({"data.recount": 0}, "data.recount=0 must be an integer >= 1"),
    ({"data.finetune_crop_scale": (1.0, 0.5)}, "data.finetune_crop_scale=(1.0, 0.5) must be"),
    ({"mesh.num_devices": -1}, "mesh.num_devices=-1 must be in 0.."),
  ],
)
def test_finetune_settings_are_refused_before_compiling(override, message):
  with pytest.raises(
    ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
  ):
    finetune.validate(_config(finetune_configs, **override), data=False)


@pytest.mark.parametrize(
  "module,override,message",
  [
    ("mae_pretrain", {"model.decoder.num_heads": 5}, "model.decoder width=64 depth=2 num_heads=5"),
    ("mae_pretrain", {"num_visualize": -1}, "num_visualize=-1 must be an integer >= 0"),
    ("tinymim_distill", {"student.drop_path": 1.5}, "drop_path=1.5 must be in [0, 1)"),
    ("tinymim_distill", {"distill.relation_heads": -2}, "relation_heads=-2 must be an integer"),
    ("tinymim_distill", {"distill.mae_weight": -1.0}, "mae_weight=-1.0 must be a finite number"),
    ("tinymim_distill", {"distill.mae_weight": float("inf")}, "mae_weight=inf must be a finite"),
    ("tinymim_distill", {"distill.beta": -1.0}, "distill.beta=-1.0 must be a finite number >= 0"),
    ("tinymim_distill", {"distill.beta": float("inf")}, "distill.beta=inf must be a finite number"),
    ("finetune", {"model.extra_width": -1}, "model.extra_width=-1 must be an integer >= 0"),
    ("finetune", {"kd.teacher.extra_width": -3}, "kd.teacher.extra_width=-3 must be an integer"),
    (
      "spark_pretrain",
      {"model.decoder_width": -8},
      "model.decoder_width=-8 must be an integer >= 32",
    ),
    (
      "hetero_distill",
      {"model.decoder_width": 16},
      "model.decoder_width=16 must be an integer >= 32",
    ),
    ("segment", {"data.ratio_range": (2.0, 0.5)}, "data.ratio_range=(2.0, 0.5) must be"),
    ("segment", {"data.cat_max_ratio": 0.0}, "data.cat_max_ratio=0 must be in (0, 1]"),
    ("segment", {"loss_weights.aux": -1.0}, "loss_weights.aux=-1.0 must be a finite number"),
    ("segment", {"schedule.power": -1.0}, "schedule.power=-1.0 must be a finite number >= 0"),
    # accepted before: an infinite power zeroed the lr after step 0, a CLIP
    # teacher ignored teacher.block, a negative seed failed only when grain
    # built the input pipeline (after the teacher was read)
    ("segment", {"schedule.power": float("inf")}, "schedule.power=inf must be a finite number"),
    ("cae", {"teacher.type": "clip", "teacher.block": 6}, "teacher.block=6 picks a ViT teacher"),
    ("finetune", {"seed": -1}, "seed=-1 must be an integer in"),
    ("tinymim_distill", {"seed": 2**32}, "seed=4294967296 must be an integer in"),
    ("segment", {"model.auxiliary_head.in_index": 9}, "in_index=9 must pick one of the neck's 4"),
    ("hetero_distill", {"optimizer.eps": 0.0}, "optimizer.eps=0.0 must be a finite number > 0"),
    ("spark_pretrain", {"model.div": 0}, "model.div=0 must be an integer >= 1"),
    ("spark_pretrain", {"optimizer.weight_decay_end": -1.0}, "weight_decay_end=-1.0 must be"),
    ("spark_pretrain", {"model.densify_norm": "bogus"}, "model.densify_norm='bogus' is not one"),
    ("cae", {"teacher.act": "bogus"}, "teacher.act='bogus' is not one of"),
    ("cae", {"model.qkv_bias": "bogus"}, "model.qkv_bias='bogus' is not one of"),
    ("cae", {"loss_weight": -1.0}, "loss_weight=-1.0 must be a finite number > 0"),
    # Accepted before: the slide windows left pixels uncovered (a division
    # by a count of 0), the heads failed when traced, mean/std of 2 values
    # failed in the input workers, the rest trained with the bad value.
    ("segment", {"eval.stride": (40, 40)}, "eval.stride=(40, 40) is larger than the 32-px"),
    ("segment", {"data.std": (1.0, 1.0)}, "data.std=(1.0, 1.0) must be 3 finite numbers"),
    ("segment", {"model.decode_head.channels": 0}, "decode_head.channels=0 must be an integer"),
    ("segment", {"model.auxiliary_head.num_convs": -1}, "num_convs=-1 must be an integer >= 0"),
    ("segment", {"model.decode_head.dropout_ratio": 1.5}, "dropout_ratio=1.5 must be in [0, 1)"),
    ("segment", {"model.decode_head.pool_scales": (0, 2)}, "pool_scales=(0, 2) must be one or"),
    ("segment", {"model.fc_dim": 0}, "model.fc_dim=0 must be an integer >= 1"),
    ("segment", {"num_classes": 1}, "num_classes=1 must be >= 2"),
    ("segment", {"num_pictures": -1}, "num_pictures=-1 must be an integer >= 0"),
    ("segment", {"schedule.warmup_ratio": 2.0}, "schedule.warmup_ratio=2.0 must be in [0, 1]"),
    ("segment", {"warmup_steps": -1}, "warmup_steps=-1 must be an integer >= 0"),
    ("finetune", {"data.mixup": -1.0}, "data.mixup=-1.0 must be a finite number >= 0"),
    ("finetune", {"data.label_smoothing": 1.0}, "data.label_smoothing=1.0 must be in [0, 1)"),
    ("finetune", {"data.mixup_prob": 1.5}, "data.mixup_prob=1.5 must be in [0, 1]"),
    ("finetune", {"data.auto_augment": "augmix-m5"}, "auto_augment='augmix-m5': only RandAugment"),
    ("finetune", {"model.pos_embed_type": "bogus"}, "model.pos_embed_type='bogus' is not one"),
    ("tinymim_distill", {"data.color_jitter": -0.4}, "data.color_jitter=-0.4 must be a finite"),
    ("tinymim_distill", {"teacher.qkv_bias": "qkv"}, "teacher.qkv_bias='qkv' is not one of"),
    ("hetero_distill", {"teacher.depth": 0}, "teacher.depth=0 must be a positive integer"),
    ("finetune", {"data.crop_pct": 0.0}, "data.crop_pct=0.0 must be in (0, 1]"),
    ("hetero_distill", {"hetero.beta": float("nan")}, "hetero.beta=nan must be a finite number"),
    ("cae", {"model.layer_scale": -0.1}, "model.layer_scale=-0.1 must be a finite number >= 0"),
    ("cae", {"teacher.output_dim": -1}, "teacher.output_dim=-1 must be an integer >= 0"),
    ("segment", {"model.layer_scale": float("nan")}, "model.layer_scale=nan must be a finite"),
    ("finetune", {"model.drop_path_schedule": "cosine"}, "drop_path_schedule='cosine' is not"),
    ("finetune", {"data.prefetch": -1}, "data.prefetch=-1 must be an integer >= 0"),
    ("segment", {"data.num_workers": -2}, "data.num_workers=-2 must be an integer >= 0"),
  ],
)
def test_stage_settings_are_refused_before_compiling(module, override, message):
  import importlib

  from mimdistill.stages import registry

  c = _config(importlib.import_module(f"configs.{module}"), **override)
  escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
  with pytest.raises(ValueError, match=escaped):
    registry.stage_module(c).validate(c, data=False)


def test_a_nan_kd_temperature_is_refused():
  c = _config(finetune_configs, "quickstart_star", **{"kd.tau": float("nan")})
  with pytest.raises(ValueError, match=r"kd.tau=nan finite and > 0"):
    finetune.validate(c, data=False)


def test_a_short_segmentation_trial_cuts_its_warmup_and_says_so(caplog):
  from configs import segment as segment_configs
  from mimdistill.stages import segment

  c = _config(segment_configs, **{"warmup_steps": 1500, "total_steps": 100})
  segment.validate(c, data=False)  # a trial of a long recipe still runs
  with caplog.at_level("WARNING", logger="mimdistill"):
    assert segment.steps(c, steps_per_epoch=10) == (100, 99)
  assert "warmup_steps=1500 is not shorter than total_steps=100" in caplog.text


def test_a_segmentation_init_source_is_checked_before_the_datasets_are_built(tmp_path, monkeypatch):
  """A missing init.source was found only after both datasets were built
  (ADE20K's first preparation takes minutes); a CNN workdir is not a ViT."""
  from configs import segment as segment_configs
  from mimdistill.data import input_pipeline
  from mimdistill.stages import segment

  def no_data(*args, **kwargs):
    raise AssertionError("the datasets were built before init.source was checked")

  monkeypatch.setattr(input_pipeline, "make_dataset", no_data)
  c = _config(segment_configs, **{"init.source": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match=r"init.source=.*nope: no such workdir or file"):
    segment.run(c, tmp_path / "seg")
  cnn = tmp_path / "cnn"
  workdir_lib.write_json(
    cnn,
    workdir_lib.CONFIG,
    {"signature": {"stage": "hetero_distill", "model": {"family": "resnet"}}},
  )
  c = _config(segment_configs, **{"init.source": str(cnn)})
  with pytest.raises(ValueError, match="is a resnet workdir .* not a ViT; init must be a ViT"):
    segment.run(c, tmp_path / "seg")


@pytest.mark.parametrize(
  "preset, field, overrides",
  [
    ("quickstart", "init.source", {}),
    ("quickstart_star", "kd.teacher.source", {"init.source": ""}),
  ],
)
def test_a_finetuning_source_is_checked_before_the_datasets_are_built(
  preset, field, overrides, tmp_path, monkeypatch
):
  """Fine-tuning read init.source and the KD teacher after building both
  datasets, which prepares a class folder on first use (minutes for an
  ImageNet-size folder) before saying the source is missing."""
  from mimdistill.data import input_pipeline

  def no_data(*args, **kwargs):
    raise AssertionError(f"the datasets were built before {field} was checked")

  monkeypatch.setattr(input_pipeline, "make_dataset", no_data)
  c = _config(finetune_configs, preset, **{**overrides, field: str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match=f"{field}=.*nope: no such workdir or file"):
    finetune.run(c, tmp_path / "ft")


def test_a_preset_without_randaugment_still_takes_it_from_the_command_line():
  # `--config.<field>=` parses by the field's type; a plain None field has
  # NoneType, which ml_collections refuses to override.
  for preset in ("quickstart", "linprobe", "cae"):
    c = finetune_configs.get_config(preset)
    assert c.data.auto_augment is None and c.data.get_type("auto_augment") is str, preset


def test_distill_mask_that_leaves_nothing_and_one_class_finetune_are_refused():
  c = _config(tinymim_distill, **{"distill.student_input": "masked", "distill.mask_ratio": 0.99})
  with pytest.raises(ValueError, match="distill.mask_ratio=0.99 leaves no visible patch"):
    distill.validate(c, data=False)
  with pytest.raises(ValueError, match="at least 2 classes"):
    finetune.validate(_config(finetune_configs, num_classes=1), data=False)


# -- 2: safetensors whose header and data lengths disagree ----------------------
def test_safetensors_with_a_short_data_section_is_refused(tmp_path):
  from mimdistill.interop.conversion import SafetensorsError, read_safetensors, write_safetensors

  path = tmp_path / "x.safetensors"
  write_safetensors(path, {"a": np.ones((4, 4), np.float32)})
  data = path.read_bytes()
  (tmp_path / "short.safetensors").write_bytes(data[:-8])
  with pytest.raises(SafetensorsError, match="truncated or its data lengths disagree"):
    read_safetensors(tmp_path / "short.safetensors")


# -- 3: one writer per workdir ----------------------------------------------------
HOLD = (
  "import sys, time; from mimdistill.workdir_lock import WorkdirLock\n"
  "with WorkdirLock(sys.argv[1]):\n  print('held', flush=True); time.sleep(60)\n"
)


def test_a_second_writer_is_refused_and_a_dead_holder_taken_over(tmp_path, caplog):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusyError, match=rf"in use by host \S+ pid {holder.pid}"):
      with WorkdirLock(tmp_path):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert (tmp_path / ".lock").is_file()  # left behind by the killed holder
  caplog.set_level("WARNING", logger="mimdistill")
  with WorkdirLock(tmp_path):
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
  assert not (tmp_path / ".lock").exists()


# -- 4 and 9: class folders: fingerprint, undecodable files ------------------------
def _image(path, value, fmt="PNG"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, fmt)


def _folder(root):
  for split in ("train", "test"):
    for c in ("a", "b"):
      for i in range(2):
        _image(root / split / c / f"{i}.png", 10 * i + (c == "b") * 100)
  return root


def test_a_changed_folder_is_prepared_again(tmp_path, caplog):
  root, data_dir = _folder(tmp_path / "imgs"), str(tmp_path / "tfds")
  caplog.set_level("INFO")
  first = sources.get_builder(f"folder:{root}", data_dir)
  sources.ensure_prepared(first)
  assert first.info.splits["train"].num_examples == 4
  (root / "train" / "a" / "0.png").unlink()
  _image(root / "train" / "c" / "0.png", 200)
  _image(root / "test" / "c" / "0.png", 201)
  sources._CURRENT.clear()  # a new run
  again = sources.get_builder(f"folder:{root}", data_dir)
  assert "changed since it was prepared (2 added" in caplog.text and "1 removed" in caplog.text
  sources.ensure_prepared(again)
  assert again.info.features["label"].names == ["a", "b", "c"]
  assert again.info.splits["train"].num_examples == 4  # 3 - 1 + ... : a1, b0, b1, c0
  sources._CURRENT.clear()
  caplog.clear()
  sources.get_builder(f"folder:{root}", data_dir)
  assert "unchanged: reusing its prepared copy" in caplog.text


def test_undecodable_files_are_named_then_refused_or_skipped(tmp_path):
  root, data_dir = _folder(tmp_path / "imgs"), str(tmp_path / "tfds")
  (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  (root / "test" / "a" / "text.jpg").write_text("a text file named .jpg")
  builder = sources.get_builder(f"folder:{root}", data_dir)
  with pytest.raises(
    ValueError, match=r"2 file\(s\) do not decode.*train/b/broken.png.*bad_files=skip"
  ):
    sources.ensure_prepared(builder)
  skipping = sources.get_builder(f"folder:{root}", data_dir, bad_files="skip")
  sources.ensure_prepared(skipping)
  assert skipping.info.splits["train"].num_examples == 4
  assert skipping.info.splits["test"].num_examples == 4
  with pytest.raises(ValueError, match="bad_files='ignore'"):
    class_folder.config_for(root, "ignore")


# -- 5: a changed config is not silently skipped or resumed --------------------------
def test_pipeline_refuses_a_finished_stage_with_another_config(tmp_path, monkeypatch):
  runs = []

  def fake_run(stage_cfg, stage_dir, **_):
    runs.append(stage_cfg.stage)
    (stage_dir / "checkpoints" / "1").mkdir(parents=True, exist_ok=True)
    return {"stage": stage_cfg.stage, "steps": 1}

  monkeypatch.setattr(pipeline.registry, "run_stage", fake_run)
  c = pipeline_configs.get_config("quickstart")
  pipeline.run_pipeline(c, tmp_path)
  stages = ["pretrain", "distill", "finetune", "segment"]
  assert runs == stages
  pipeline.run_pipeline(pipeline_configs.get_config("quickstart"), tmp_path)  # all skipped
  assert len(runs) == 4
  c = pipeline_configs.get_config("quickstart")
  before, c.distill.total_epochs = c.distill.total_epochs, 8.0
  with pytest.raises(
    ValueError,
    match=rf"stage 'distill' finished .*total_epochs: {before} there, 8.0 now.*rerun_from=distill",
  ):
    pipeline.run_pipeline(c, tmp_path)

  def changed():
    c = pipeline_configs.get_config("quickstart")
    c.distill.total_epochs, c.rerun_from = 8.0, "distill"
    return c

  pipeline.run_pipeline(changed(), tmp_path)
  assert runs[4:] == stages[1:]
  kept = sorted(p.name for p in tmp_path.iterdir() if ".replaced-" in p.name)
  assert [k.split(".")[0] for k in kept] == stages[1:]
  pipeline.run_pipeline(changed(), tmp_path)  # the same rerun again: moves nothing
  assert len(runs) == 7 and len([p for p in tmp_path.iterdir() if ".replaced-" in p.name]) == 3


def test_pipeline_checks_every_stage_before_the_first_runs(tmp_path, monkeypatch):
  runs = []
  monkeypatch.setattr(pipeline.registry, "run_stage", lambda cfg, d, **_: runs.append(cfg.stage))
  c = pipeline_configs.get_config("quickstart")
  c.segment.schedule.power = -1.0  # the last stage's
  with pytest.raises(ValueError, match=r"schedule.power=-1.0 must be a finite number >= 0"):
    pipeline.run_pipeline(c, tmp_path)
  assert runs == [] and not (tmp_path / "pretrain").exists()


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"stages": " , "}, r"config.stages=' , ' names no stage; set --config.stages to some of"),
    ({"stages": "pretrain,pretrain,distill"}, r"names \['pretrain'\] twice"),
    # Each of these ran the earlier stages and then started a stage from
    # the wrong checkpoint (fine-tuning from the configured default, a
    # distillation from the classifier) or failed after hours of training.
    ({"stages": "finetune,pretrain"}, r"runs 'pretrain' \(pre-training\) after 'finetune'"),
    ({"stages": "pretrain,finetune,distill"}, r"runs 'distill' \(distillation\) after 'finetune'"),
    (
      {"stages": "pretrain,distill,segment,finetune"},
      r"'finetune' would start from 'segment', .* put 'finetune' before 'segment'",
    ),
    (
      {"segment.parent": ""},
      r"'segment' would start from 'finetune'.*--config.segment.parent=finetune",
    ),
    ({"segment.parent": "bogus"}, r"names parent 'bogus', which does not run before it"),
    # teacher_source was ignored when no distillation stage comes first.
    (
      {"stages": "finetune", "teacher_source": "mae.pth"},
      r"teacher_source=mae.pth has no stage to teach: the first stage to run, 'finetune'",
    ),
  ],
)
def test_pipeline_refuses_a_bad_stage_list_before_any_stage_runs(
  tmp_path, monkeypatch, overrides, message
):
  runs = []
  monkeypatch.setattr(
    pipeline.registry, "run_stage", lambda cfg, d, **_: runs.append(cfg.stage) or {}
  )
  c = pipeline_configs.get_config("quickstart")
  for key, value in overrides.items():
    set_path(c, key, value)
  with pytest.raises(ValueError, match=message):
    pipeline.run_pipeline(c, tmp_path)
  assert runs == []


def _pipeline_presets():
  names = (*pipeline_configs._THREE_STAGES, *pipeline_configs._HETERO) + (
    "imagenet_chain",
    "imagenet_star",
    "quickstart_star",
  )
  out = list(dict.fromkeys(names))
  for baseline in ("mae_baseline", "scratch_baseline", "cae", "spark_baseline"):
    for name in dict.fromkeys(names):
      try:
        pipeline_configs.get_config(f"{baseline}:{name}")
      except ValueError:
        continue  # a baseline that preset does not have, refused by name
      out.append(f"{baseline}:{name}")
  return out


def test_every_pipeline_preset_plans_and_links_its_stages(tmp_path, monkeypatch):
  """Each preset and baseline gets past the stage-list, teacher_source and
  per-stage checks, and every stage is handed a parent (scratch_baseline and
  spark_baseline kept the preset's teacher_source with nothing to teach)."""
  presets = _pipeline_presets()
  assert len(presets) >= 30, presets
  runs = []

  def fake_run(cfg, d, **_):
    runs.append(cfg.stage)
    (d / "checkpoints" / "1").mkdir(parents=True, exist_ok=True)
    return {}

  monkeypatch.setattr(pipeline.registry, "run_stage", fake_run)
  for preset in presets:
    runs.clear()
    config = pipeline_configs.get_config(preset)
    for key in config.keys():
      if hasattr(config[key], "stage"):  # the suite's 8 fake devices do not divide 500
        config[key].mesh.num_devices = 1
    pipeline.run_pipeline(config, tmp_path / preset.replace(":", "_"))
    assert runs, preset


def test_pipeline_runs_a_named_parent_and_refuses_a_mae_baseline_it_cannot_build(
  tmp_path, monkeypatch
):
  runs = []
  monkeypatch.setattr(
    pipeline.registry,
    "run_stage",
    lambda cfg, d, **_: runs.append((cfg.stage, cfg.init.source if "init" in cfg else "")) or {},
  )
  c = pipeline_configs.get_config("quickstart")
  c.segment.parent = "finetune"  # on purpose: segmentation from the fine-tuned classifier
  pipeline.run_pipeline(c, tmp_path)
  assert runs[-1] == ("segment", str(tmp_path / "finetune"))
  # The chain's MAE baseline pre-trains its last student, not the first one,
  # and does not skip its own stage 1 for the chain's external teacher.
  chain = pipeline_configs.get_config("mae_baseline:imagenet_chain")
  assert chain.teacher_source == "" and chain.stages == "pretrain,finetune"
  assert chain.pretrain.model.variant == chain.distill_t.student.variant
  with pytest.raises(
    ValueError, match=r"mae_baseline:quickstart_star: MAE pre-training has no distillation token"
  ):
    pipeline_configs.get_config("mae_baseline:quickstart_star")


def test_a_stage_resumed_with_another_dataset_or_batch_is_refused(tmp_path):
  config = _config(mae_pretrain)
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  loop_lib.check_workdir(tmp_path, config.to_dict(), {"stage": "pretrain"})
  longer = config.to_dict()
  longer["total_epochs"] = 30.0
  longer["log_every"] = 1
  loop_lib.check_workdir(tmp_path, longer, {"stage": "pretrain"})  # longer: fine
  other = json.loads(json.dumps(config.to_dict()))
  other["batch_size"] = 64
  other["data"]["name"] = "folder:/x"
  with pytest.raises(ValueError, match=r"batch_size: 128 there, 64 now; data.name: 'embedded'"):
    loop_lib.check_workdir(tmp_path, other, {"stage": "pretrain"})
  saved = workdir_lib.read_json(tmp_path, workdir_lib.CONFIG)["config"]
  assert saved["batch_size"] == 128  # config.json was not overwritten


# -- 6: a teacher workdir's recorded architecture -------------------------------------
def test_teacher_architecture_is_read_from_its_workdir(tmp_path):
  model = dict(width=64, depth=4, num_heads=4, patch_size=4, image_size=32)
  workdir_lib.write_json(
    tmp_path, workdir_lib.CONFIG, {"config": {}, "signature": {"model": model}}
  )
  c = _config(tinymim_distill, **{"teacher.source": str(tmp_path), "teacher.num_heads": 2})
  with pytest.raises(
    ValueError, match=r"teacher.num_heads=2 but 4 there.*--config.teacher.num_heads=4"
  ):
    distill.check_recorded_architecture(c.teacher, c.teacher.source, "teacher")
  c = _config(tinymim_distill, **{"teacher.source": str(tmp_path)})
  c.teacher.update(width=None, depth=None, num_heads=None, patch_size=None)
  distill.check_recorded_architecture(c.teacher, c.teacher.source, "teacher")
  assert (c.teacher.width, c.teacher.depth, c.teacher.num_heads) == (64, 4, 4)


# -- 8: image modes -----------------------------------------------------------------
def test_16_bit_and_float_images_become_8_bit():
  buffer = io.BytesIO()
  Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(buffer, "PNG")
  assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")
  np.testing.assert_array_equal(
    np.asarray(sources.decode_image(buffer.getvalue()))[0, :, 0], [0, 128, 255]
  )
  as_i = Image.fromarray(np.array([[0, 32768, 65535]], np.int32), "I")
  as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
  for image in (as_i, as_f):
    np.testing.assert_array_equal(np.asarray(sources.to_8bit(image))[0], [0, 128, 255])


# -- 10, 11, 14: the loop: damaged checkpoints, NaN stops, the applied lr -------------
class Batches:
  """Host batches in order (no grain iterator to checkpoint)."""

  grain_iterator = None

  def __init__(self, batches):
    self.batches = list(batches)
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.batches[min(self.i, len(self.batches) - 1)]
    self.i += 1
    return batch


def _toy_task(total_steps, accumulate=1):
  def loss_fn(params, model_state, batch, rng, inputs):
    return jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2), ({}, model_state)

  schedule = optax.linear_schedule(0.1, 0.0, 100)
  return loop_lib.Task(
    name="toy",
    init_variables=lambda rng: {"params": {"w": jax.random.normal(rng, (4, 2))}},
    loss_fn=loss_fn,
    make_optimizer=lambda params, sched: (
      optax.MultiSteps(optax.sgd(sched), accumulate) if accumulate > 1 else optax.sgd(sched)
    ),
    schedule=schedule,
    total_steps=total_steps,
    images_per_step=8,
    accumulate_steps=accumulate,
  )


LOOP = loop_lib.LoopConfig(
  seed=0, log_every=1, checkpoint_every=2, keep_checkpoints=5, async_checkpoints=False
)
MESH = shard_lib.make_mesh(1, num_devices=1)
X = {"x": np.ones((8, 4), np.float32)}


def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_resumed(tmp_path, caplog):
  loop_lib.train(_toy_task(4), Batches([X]), tmp_path, LOOP, mesh=MESH)
  # Truncate the data files of step 4 (Orbax's OCDBT chunks).
  for data in (tmp_path / "checkpoints" / "4" / "state").rglob("d/*"):
    data.write_bytes(data.read_bytes()[:10])
  caplog.set_level("WARNING", logger="mimdistill")
  result = loop_lib.train(_toy_task(6), Batches([X]), tmp_path, LOOP, mesh=MESH)
  assert "checkpoint step 4" in caplog.text and "damaged" in caplog.text
  assert int(result.state.step) == 6 and (tmp_path / "checkpoints" / "4.damaged").is_dir()
  # Every step damaged: state/ deleted.
  import shutil

  assert workdir_lib.checkpoint_steps(tmp_path) == [2, 4, 6]
  for step in (2, 4, 6):
    shutil.rmtree(tmp_path / "checkpoints" / str(step) / "state")
  with pytest.raises(OSError, match=r"every checkpoint in .* is damaged .*delete"):
    loop_lib.train(_toy_task(8), Batches([X]), tmp_path, LOOP, mesh=MESH)


def test_a_nan_stop_names_the_kept_checkpoint_and_saves_nothing_after(tmp_path):
  bad = {"x": np.full((8, 4), np.nan, np.float32)}
  with pytest.raises(
    FloatingPointError, match=r"step 3.*newest checkpoint, step 2, loss .* is kept"
  ):
    loop_lib.train(_toy_task(6), Batches([X, X, bad]), tmp_path, LOOP, mesh=MESH)
  assert workdir_lib.checkpoint_steps(tmp_path) == [2]
  with pytest.raises(FloatingPointError, match="no checkpoint was saved before it"):
    loop_lib.train(_toy_task(6), Batches([bad]), tmp_path / "b", LOOP, mesh=MESH)
  assert workdir_lib.checkpoint_steps(tmp_path / "b") == []


def test_a_step_with_a_non_finite_gradient_or_loss_changes_nothing():
  """The update keeps params, model state and optimizer moments when the loss
  or only the gradient (a finite loss whose gradient overflows) is not
  finite, and applies a finite step as before."""

  def loss_fn(params, model_state, batch, rng, inputs):
    # sqrt'(0) = inf: a finite loss (0) with an infinite gradient.
    loss = jnp.sum(jnp.sqrt(jnp.abs(params["w"] - batch["at"]))) + batch["add"]
    return loss, ({}, {"count": model_state["count"] + 1})

  task = dataclasses.replace(
    _toy_task(4),
    loss_fn=loss_fn,
    make_optimizer=lambda params, sched: optax.adam(0.1),
  )
  tx = task.make_optimizer(None, task.schedule)
  params = {"w": jnp.ones((2,))}
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state={"count": jnp.zeros(())},
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(0),
  )
  update = jax.jit(loop_lib.build_update(task, tx))
  cases = {"finite": (0.0, 0.0), "infinite gradient": (1.0, 0.0), "nan loss": (0.0, np.nan)}
  for name, (at, add) in cases.items():
    new, metrics = update(state, {"at": jnp.full((2,), at), "add": jnp.asarray(add)}, None)
    assert int(new.step) == 1, name
    changed = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state))
    ]
    if name == "finite":
      assert int(metrics["nonfinite"]) == 0 and sum(changed) >= 4  # step, w, count, mu, nu
    else:
      assert int(metrics["nonfinite"]) == 1, name
      assert sum(changed) == 1, name  # the step counter only


def test_the_logged_lr_under_accumulation_is_the_applied_one(tmp_path):
  loop_lib.train(_toy_task(6, accumulate=3), Batches([X]), tmp_path, LOOP, mesh=MESH)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  lrs = [round(line["lr"], 6) for line in lines if line["prefix"] == "train"]
  schedule = optax.linear_schedule(0.1, 0.0, 100)
  assert lrs == [round(float(schedule(s // 3 * 3)), 6) for s in range(6)]


# -- 12: one-line errors from the launch scripts ----------------------------------------
@pytest.mark.parametrize(
  "args,message",
  [
    (
      ["--config.batchsize=3"],
      "mae_pretrain.py:quickstart has no 'batchsize'; did you mean 'batch_size'?",
    ),
    # no near miss: ml_collections' own error is a bare "'lr'"; the fields are listed instead
    (
      ["--config.optimizer.lr=1"],
      "error: unknown config field 'optimizer.lr': config.optimizer has no 'lr'; its fields: accumulate_steps, b1, b2,",
    ),
    (["--config.student.depth=2"], "error: unknown config field 'student.depth': "),
    (
      ["--config.data.name=/data/imgs"],
      "looks like a folder; a folder of class folders is 'folder:/data/imgs'",
    ),
    (["--config.keep_checkpoints=0"], "error: keep_checkpoints=0 must be an integer >= 1"),
    # absl read `--config.model.remat False` as remat=True and dropped
    # 'False': the opposite setting, silently; stray words were ignored too
    (
      ["--config.model.remat", "False"],
      "'False': a boolean flag takes no separate value; write --config.model.remat=False",
    ),
    (["--multihost", "no"], "write --multihost=no, with '='"),
    (["extra"], "error: unexpected argument 'extra'; every setting is a flag"),
  ],
)
def test_launch_scripts_print_one_line(args, message, tmp_path):
  cmd = [
    sys.executable,
    str(REPO / "launch" / "train.py"),
    "--config",
    str(REPO / "configs" / "mae_pretrain.py") + ":quickstart",
    "--workdir",
    str(tmp_path),
    *args,
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_a_boolean_flag_given_a_separate_value_is_named_in_every_command(tmp_path, capsys):
  """The check scripts and convert take plain absl flags: `--keep False`
  kept the files, and convert's count error did not say why."""
  from mimdistill import convert

  assert convert.main([str(tmp_path / "a"), str(tmp_path / "b"), "--overwrite", "False"]) == 2
  assert "write --overwrite=False, with '='" in capsys.readouterr().err
  cmd = [sys.executable, str(REPO / "launch" / "measure_convert_memory.py")]
  out = subprocess.run(
    [*cmd, f"--dir={tmp_path / 'm'}", "--keep", "False"],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    timeout=300,
  )
  assert out.returncode == 2 and "write --keep=False" in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "m").exists()  # refused before the 12 GB scratch file is written


def test_kill_resume_check_does_not_wipe_a_folder_it_did_not_make(tmp_path):
  """Its --dir is deleted before each check: --dir=workdirs deleted real runs."""
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "ckpt").write_text("finished work")
  cmd = [sys.executable, str(REPO / "launch" / "kill_resume_check.py"), f"--dir={tmp_path}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert out.returncode == 2 and "did not create" in out.stderr, out.stderr[-2000:]
  assert (tmp_path / "run" / "ckpt").read_text() == "finished work"


def test_a_scratch_folder_is_emptied_only_when_its_script_made_it(tmp_path):
  from mimdistill import scratch_folder

  (tmp_path / "w" / "run").mkdir(parents=True)
  (tmp_path / "w" / "run" / "ckpt").write_text("finished work")
  with pytest.raises(ValueError, match="non-empty folder check.py did not create"):
    scratch_folder.fresh(tmp_path / "w", "check.py")
  assert (tmp_path / "w" / "run" / "ckpt").exists()
  with pytest.raises(ValueError, match="is a file"):
    scratch_folder.fresh(tmp_path / "w" / "run" / "ckpt", "check.py")
  root = scratch_folder.fresh(tmp_path / "s", "check.py")  # new
  (root / "leftover").write_text("from the last run")
  assert sorted(p.name for p in scratch_folder.fresh(root, "check.py").iterdir()) == [
    scratch_folder.MARKER
  ]


def test_a_workdir_that_cannot_be_a_folder_is_refused_before_the_log_opens(tmp_path):
  """A file (or a path under one) as --workdir was a bare errno from the log
  file (after the config had loaded); a pipeline config given to train.py
  did not say which command runs it."""
  from mimdistill.paths import check_workdir
  from mimdistill.stages import registry

  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(ValueError, match="--workdir is empty"):
    check_workdir("")
  with pytest.raises(ValueError, match=r"afile is a file, not a folder; pass a folder"):
    check_workdir(afile)
  with pytest.raises(ValueError, match=r"afile/sub/w is under the file .*afile; pass a folder"):
    check_workdir(afile / "sub" / "w")
  assert check_workdir(tmp_path / "new" / "w") == tmp_path / "new" / "w"
  assert not (tmp_path / "new").exists()  # checking creates nothing
  with pytest.raises(ValueError, match=r"--workdir=.*afile is a file"):
    pipeline.run_pipeline(pipeline_configs.get_config("quickstart"), afile)
  with pytest.raises(ValueError, match=r"--workdir=.*afile is a file"):
    registry.run_stage(_config(mae_pretrain), afile)
  with pytest.raises(ValueError, match="pipeline config .* run it with launch/pipeline.py"):
    registry.run_stage(pipeline_configs.get_config("quickstart"), tmp_path / "w")
  # ... and the other way round (an AttributeError traceback)
  with pytest.raises(ValueError, match="is a pretrain stage config: run it with launch/train.py"):
    pipeline.run_pipeline(_config(mae_pretrain), tmp_path / "p")
  assert not (tmp_path / "p").exists()
  cmd = [
    sys.executable,
    str(REPO / "launch" / "train.py"),
    "--config",
    str(REPO / "configs" / "mae_pretrain.py") + ":quickstart",
    f"--workdir={afile}/run",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert "afile/run is under the file" in lines[0] and afile.read_text() == "x"


# -- 13: the destination's extension decides the format; timm options named ------------
def test_convert_to_pth_writes_a_torch_checkpoint_and_odd_vits_are_named(tmp_path):
  from test_convert import official_shapes, random_state

  from mimdistill.interop.conversion import convert
  from mimdistill.interop.layouts import LayoutError
  from mimdistill.interop.pth_reader import load_pth
  from mimdistill.interop.pth_writer import write_state_dict

  state = random_state(official_shapes("finetune"))
  src = write_state_dict(tmp_path / "src.pth", state)
  report = convert(src, tmp_path / "w", num_heads=2)
  convert(tmp_path / "w", tmp_path / "out.pth")
  back = load_pth(tmp_path / "out.pth")
  assert back.source_key == "model" and list(back.tensors) == list(state)
  for name, value in state.items():
    assert back.tensors[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
  assert any("global_pool='avg'" in n for n in report.notes) == (report.spec.pooling == "cls")
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None:  # the official loader, when this environment has torch
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert set(loaded) == set(state)
  with pytest.raises(ValueError, match=r"unknown extension '.ckpt'"):
    convert(tmp_path / "w", tmp_path / "out.ckpt")
  cases = {
    "reg_token": ({"reg_token": np.zeros((1, 4, 32), np.float32)}, "reg_tokens=N"),
    "no_embed_class": ({"pos_embed": np.zeros((1, 16, 32), np.float32)}, "no_embed_class=True"),
  }
  for name, (change, message) in cases.items():
    odd = write_state_dict(tmp_path / f"{name}.pth", {**state, **change})
    with pytest.raises(LayoutError, match=message):
      convert(odd, tmp_path / f"{name}.safetensors", allow_unknown=True)
  no_cls = write_state_dict(
    tmp_path / "nocls.pth", {k: v for k, v in state.items() if k != "cls_token"}
  )
  with pytest.raises(LayoutError, match="class_token=False"):
    convert(no_cls, tmp_path / "nocls.safetensors", allow_unknown=True)
