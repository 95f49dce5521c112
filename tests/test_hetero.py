"""Heterogeneous CNN students (issue 16, phase 2): the distillation task on 8
devices == 1 through `loop.prepare` (params and sparse BatchNorm
statistics), the hetero pipeline end to end at test size (ViT teacher ->
sparse CNN -> CNN fine-tuning, pictures, lineage, a CNN init from a timm
.pth), the teacher-token loss on its positions, and the one-line errors."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY_RUN, set_path
from test_cnn_models import numpy_variables

from mimdistill.objectives import hetero_loss
from mimdistill.stages import cnn_finetune, distill, finetune, spark_pretrain
from mimdistill.stages import hetero_distill as hd
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib
from mimdistill.training.state import TrainState

sys.path.insert(0, str(REPO))
from configs import finetune as finetune_cfg  # noqa: E402
from configs import hetero_distill, pipeline  # noqa: E402

# The smallest student and teacher that keep every piece: a basic-block
# ResNet with one block per stage and widths / 16, a 32-wide one-block ViT
# with 16-px patches at 64 px (a 4x4 token grid over the 2x2 mask grid).
STUDENT = dict(depth=None, block="basic", layers=(1, 1, 1, 1), div=16, decoder_width=32)
TEACHER = dict(variant="custom", width=32, depth=1, num_heads=2, patch_size=16, image_size=64)


def tiny_config(tfds_dir=None, **overrides):
  c = hetero_distill.get_config("quickstart")
  c.model.update(STUDENT)
  c.teacher.update(source="unused", **TEACHER)
  c.data.update(data_dir=tfds_dir and str(tfds_dir), num_workers=0)
  c.mesh.num_devices = 1
  c.update(TINY_RUN)
  for k, v in overrides.items():
    set_path(c, k, v)
  return c


def random_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.standard_normal((n, 64, 64, 3)).astype(np.float32),
    "label": np.zeros((n,), np.int32),
  }


def host_state(task, student, config) -> TrainState:
  """A numpy train state (no compiled init: the same for both meshes)."""
  images, active = spark_pretrain.dummy_inputs(config)
  variables = numpy_variables(student, images, active)
  params = variables.pop("params")
  opt = jax.eval_shape(task.make_optimizer(params, task.schedule).init, params)
  opt = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), opt)
  return TrainState(
    step=np.zeros((), np.int32),
    params=params,
    model_state=variables,
    opt_state=opt,
    rng=np.asarray(jax.random.PRNGKey(0)),
  )


def test_eight_devices_equal_one_through_prepare():
  """3 LAMB steps of the stage's task: params and the sparse BatchNorm
  statistics (reduced over the active positions of the global batch) on a
  ('data',) mesh of 8 equal 1 device."""
  assert jax.device_count() == 8
  config = tiny_config()
  teacher, teacher_vars = distill.random_teacher(config)
  student = hd.build_student(config)
  task = hd.build_task(config, student, teacher, teacher_vars, 100)
  start = host_state(task, student, config)
  batch = random_batch()
  results = {}
  for n in (1, 8):
    prep = loop_lib.prepare(task, shard_lib.make_mesh(1, devices=jax.devices()[:n]), start.rng)
    state = jax.device_put(start, prep.state_sharding)
    for _ in range(3):
      state, metrics = prep.update(state, prep.place_batch(batch), prep.inputs)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["feature"]) > 0
    results[n] = jax.device_get((state.params, state.model_state["batch_stats"]))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  jax.tree_util.tree_map(close, results[1], results[8])
  # The statistics moved (every BatchNorm saw a training batch) ...
  moved = jax.tree_util.tree_map(
    lambda a, b: not np.allclose(a, b), start.model_state["batch_stats"], results[8][1]
  )
  assert all(jax.tree_util.tree_leaves(moved))
  # ... and without the pixel loss no decoder block past the teacher's stride exists.
  assert set(results[1][0]["dense_decoder"]) == {"dec_0"}
  assert "teacher_proj" in results[1][0]


def test_token_loss_counts_the_chosen_positions():
  pred = jnp.zeros((1, 16, 4))
  teacher = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 4)), jnp.float32)
  active = jnp.array([[[True, False], [False, False]]])  # one visible cell = 4 tokens

  @jax.jit  # one compile for all of them
  def losses(pred, teacher, active):
    out = {"mse": hetero_loss.token_losses(pred, teacher, "mse")}
    out["smooth_l1"] = hetero_loss.token_losses(pred, teacher, "smooth_l1", beta=2.0)
    for positions in hetero_loss.POSITIONS:
      out[positions] = hetero_loss.token_regression_loss(
        pred, teacher, active, positions=positions, loss="mse"
      )
    return out

  out = jax.device_get(losses(pred, teacher, active))
  visible = np.repeat(np.repeat(np.asarray(active[0]), 2, 0), 2, 1).reshape(16)
  for positions, chosen in (("visible", visible), ("masked", ~visible), ("all", visible | True)):
    np.testing.assert_allclose(out[positions], out["mse"][0][chosen].mean(), rtol=1e-6)
  # Whitened targets: zero predictions cost 1 per channel under MSE.
  np.testing.assert_allclose(out["mse"], 1.0, rtol=1e-4)
  assert float(out["smooth_l1"].mean()) < float(out["mse"].mean())


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"data.image_size": 80, "model.image_size": 80, "teacher.image_size": 80},
      "image size 80 is not a multiple of 32",
    ),
    (
      {"data.image_size": 96, "model.image_size": 96, "teacher.image_size": 96},
      None,  # a valid 3x3 mask grid: no error
    ),
    (
      {
        "data.image_size": 96,
        "model.image_size": 96,
        "teacher.image_size": 96,
        "teacher.patch_size": 12,
      },
      r"teacher.patch_size=12: its 8x8 patch grid does not line up with the student's 3x3 mask",
    ),
    ({"teacher.image_size": 128}, "teacher.image_size=128 differs from data.image_size=64"),
    ({"model.depth": 19, "model.block": None, "model.layers": None}, "unknown ResNet depth 19"),
    (
      {
        "model.family": "convnext",
        "model.variant": "huge",
        "model.block": None,
        "model.layers": None,
        "model.div": None,
      },
      "unknown ConvNeXt variant 'huge'",
    ),
    ({"model.family": "vgg"}, "unknown CNN family 'vgg'"),
    ({"mask_ratio": 0.9}, r"keeps 0 of the 2x2 mask cells"),
    ({"hetero.positions": "edges"}, "hetero.positions='edges' is not one of"),
    ({"teacher.block": 3}, "teacher.block=3 is beyond the teacher's depth 1"),
  ],
)
def test_config_errors_are_one_line(overrides, message):
  config = tiny_config(**overrides)
  if message is None:
    hd.validate(config, data=False)
    return
  with pytest.raises(ValueError, match=message) as err:
    hd.validate(config, data=False)
  assert "\n" not in str(err.value)


def test_a_teacher_that_is_not_a_vit_is_refused(tmp_path):
  from pth_writer import write_state_dict

  from mimdistill.interop.cnn_checkpoint import export_cnn
  from mimdistill.models import factory

  # A CNN workdir (what the SparK / hetero stages record) ...
  cnn_workdir = tmp_path / "spark"
  cnn_workdir.mkdir()
  signature = {"stage": "spark_pretrain", "model": {"family": "resnet", "depth": 18}}
  (cnn_workdir / "config.json").write_text(json.dumps({"signature": signature}))
  with pytest.raises(
    ValueError, match=r"is a resnet workdir \(stage 'spark_pretrain'\), not a ViT"
  ):
    hd.validate(tiny_config(**{"teacher.source": str(cnn_workdir)}))
  # ... and a timm ResNet checkpoint.
  cnn = factory.build("cnn", tiny_config().model, num_classes=3)
  state = export_cnn(numpy_variables(cnn, jnp.zeros((1, 64, 64, 3))), "resnet")
  pth = write_state_dict(tmp_path / "resnet.pth", state, wrap=None)
  with pytest.raises(ValueError, match="is a resnet CNN checkpoint, not a ViT"):
    hd.validate(tiny_config(**{"teacher.source": str(pth)}))


# -----------------------------------------------------------------------------
# The pipeline: stage-1 ViT -> hetero distillation -> CNN fine-tuning
# -----------------------------------------------------------------------------
def tiny_hetero_pipeline(tfds_dir):
  c = pipeline.get_config("hetero_quickstart")
  for name in ("pretrain", "hetero", "finetune"):
    set_path(c, f"{name}.data.data_dir", str(tfds_dir))
    c[name].update(TINY_RUN)
  vit = {k: v for k, v in TEACHER.items() if k != "variant"}
  c.pretrain.model.update(vit)
  c.pretrain.model.decoder.update(width=32, depth=1, num_heads=2)
  c.pretrain.num_visualize = 2
  c.hetero.teacher.update(vit)
  c.hetero.model.update(STUDENT)
  c.hetero.hetero.pixel_weight = 1.0  # the whole SparK decoder and the reconstruction picture
  c.hetero.num_visualize = 2
  c.finetune.model.update({k: v for k, v in STUDENT.items() if k != "decoder_width"})
  c.finetune.eval_batch_size = 200
  c.finetune.figures = False
  return c


@pytest.fixture(scope="module")
def hetero_pipeline(tfds_dir, tmp_path_factory):
  from mimdistill.stages.pipeline import run_pipeline

  workdir = tmp_path_factory.mktemp("hetero")
  config = tiny_hetero_pipeline(tfds_dir)
  return config, workdir, run_pipeline(config, workdir)


def test_hetero_pipeline_end_to_end(hetero_pipeline):
  from mimdistill.stages.pipeline import run_pipeline

  config, workdir, summary = hetero_pipeline
  stages = {s["name"]: s for s in summary["stages"]}
  assert list(stages) == ["pretrain", "hetero", "finetune"]
  assert (workdir / "pretrain" / "reconstructions.png").is_file()
  assert (workdir / "hetero" / "hetero_maps.png").is_file()
  hetero_parent = stages["hetero"]["lineage"]["parent"]
  assert hetero_parent["path"] == stages["pretrain"]["checkpoint"]
  assert stages["finetune"]["lineage"]["parent"]["path"] == stages["hetero"]["checkpoint"]
  assert 0.0 <= stages["finetune"]["top1"] <= 1.0
  metrics = [json.loads(l) for l in (workdir / "hetero" / "metrics.jsonl").read_text().splitlines()]
  assert {"feature", "pixel", "loss", "lr"} <= set(metrics[-1])
  # A rerun skips every finished stage.
  again = run_pipeline(config, workdir)
  assert all(s.get("skipped") for s in again["stages"])


def test_cnn_workdirs_export_with_timm_names(hetero_pipeline, tmp_path):
  """`mimdistill.convert` writes a fine-tuned CNN (the classifier) and a
  hetero workdir (its encoder only) as timm-named files that read back to
  the workdir's params and BatchNorm statistics."""
  from mimdistill.convert import main as convert_main
  from mimdistill.interop.cnn_checkpoint import import_cnn
  from mimdistill.interop.orbax_tree import restore_subtree

  _, workdir, _ = hetero_pipeline
  for stage, root in (("finetune", ()), ("hetero", ("encoder",))):
    dst = tmp_path / f"{stage}.pth"
    assert convert_main([str(workdir / stage), str(dst)]) == 0
    back = import_cnn(dst)
    params, _ = restore_subtree(str(workdir / stage), ("params", *root))
    stats, _ = restore_subtree(str(workdir / stage), ("model_state", "batch_stats", *root))
    assert back.fields["family"] == "resnet" and ("fc" in params) == (not root)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables["params"], params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables["batch_stats"], stats)
  assert convert_main([str(workdir / "finetune"), str(tmp_path / "finetune.pth")]) == 2  # exists
  # its best/ exports the same way (it was read as a ViT checkpoint and refused)
  from mimdistill.interop.orbax_tree import restore_best

  assert convert_main([str(workdir / "finetune" / "best"), str(tmp_path / "best.pth")]) == 0
  best, _ = restore_best(workdir / "finetune" / "best")
  back = import_cnn(tmp_path / "best.pth")
  jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables["params"], best["params"])
  stats = best["model_state"]["batch_stats"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables["batch_stats"], stats)
  # A CNN's weights say everything: a ViT option is refused, not ignored.
  assert convert_main([str(workdir / "hetero"), str(tmp_path / "h.pth"), "--num_heads=4"]) == 2
  assert not (tmp_path / "h.pth").exists()


def test_cnn_init_sources(hetero_pipeline, tmp_path):
  """A hetero workdir's encoder and a timm .pth load into the CNN
  classifier; a ViT workdir and another architecture are refused."""
  from pth_writer import write_state_dict

  from mimdistill.interop.cnn_checkpoint import export_cnn
  from mimdistill.interop.orbax_tree import restore_subtree

  config, workdir, _ = hetero_pipeline
  ft = config.finetune
  model = finetune.build_model(ft, 10)
  params = finetune.abstract_params(model)
  ft.init.source = str(workdir / "hetero")
  loaded, record = finetune.init_from_source(params, ft)
  encoder, _ = restore_subtree(str(workdir / "hetero"), ("params", "encoder"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, encoder)
  assert "fc" not in loaded and record["kind"] == "workdir"

  # a CNN fine-tuning's best/ (it was "no such workdir")
  from mimdistill.interop.orbax_tree import restore_best

  ft.init.source = str(workdir / "finetune" / "best")
  loaded, record = finetune.init_from_source(params, ft)
  best, _ = restore_best(workdir / "finetune" / "best")
  assert record["kind"] == "best" and set(loaded) <= set(best["params"])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, loaded, {k: best["params"][k] for k in loaded}
  )

  variables = numpy_variables(model, jnp.zeros((1, 64, 64, 3)))
  pth = write_state_dict(tmp_path / "timm.pth", export_cnn(variables, "resnet"), wrap=None)
  ft.init.source = str(pth)
  loaded, _ = finetune.init_from_source(params, ft)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables["params"])

  ft.init.source = str(workdir / "pretrain")
  with pytest.raises(ValueError, match="holds no CNN"):
    finetune.init_from_source(params, ft)
  other = finetune_cfg.get_config("cnn_quickstart")
  other.model.update(block="basic", layers=(1, 2, 1, 1), div=16)
  other.init.source = str(workdir / "hetero")
  wide = finetune.abstract_params(finetune.build_model(other, 10))
  with pytest.raises(ValueError, match="is a CNN of another architecture.*missing"):
    finetune.init_from_source(wide, other)


def test_cnn_presets_validate():
  """Every CNN preset builds its config and passes the data-free checks."""
  for arg in ("cnn_quickstart", "cnn_resnet50", "cnn_resnet101", "cnn_convnext_tiny"):
    c = finetune_cfg.get_config(arg)
    c.mesh.num_devices = 1
    c.batch_size = c.eval_batch_size = 8
    finetune.validate(c, data=False)
    assert isinstance(cnn_finetune.model_spec(c), cnn_finetune.CNNSpec)
  for arg in ("quickstart", "resnet50_from_base", "resnet50_from_large", "convnext_tiny_from_base"):
    c = hetero_distill.get_config(arg)
    c.mesh.num_devices, c.batch_size = 1, 8
    hd.validate(c, data=False)
  for arg in ("hetero_quickstart", "spark_baseline:hetero_quickstart", "hetero_imagenet_resnet50"):
    pipeline.get_config(arg)
  with pytest.raises(ValueError, match="use spark_baseline or scratch_baseline"):
    pipeline.get_config("mae_baseline:hetero_quickstart")
