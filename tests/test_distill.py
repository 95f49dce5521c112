"""Stage 2 (TinyMIM distillation) on tiny models: frozen student params, a
teacher that is never trained, saved or run past its target block, sharding
equivalence, every ablation target on real images, early errors, teachers
from a stage-1 workdir, a stage-2 workdir (sequential) and an official .pth."""

import copy
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, TINY_RUN, set_path, shared_path

from mimdistill import workdir as workdir_lib
from mimdistill.interop.official_names import official_names_of, official_to_flax
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.interop.pth_reader import load_pth
from mimdistill.stages import distill, pretrain
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib
from mimdistill.training.optimizer import path_names

sys.path.insert(0, str(REPO))
from configs import mae_pretrain, tinymim_distill  # noqa: E402

# One block each keeps every compile short; tests that need more say so.
TEACHER = dict(width=64, depth=1, num_heads=4, patch_size=4, image_size=32)
STUDENT = dict(width=32, depth=1, num_heads=2, patch_size=4, image_size=32)


def tiny_config(arg="quickstart", tfds_dir=None, **overrides):
  c = tinymim_distill.get_config(arg)
  c.teacher.update(variant="custom", source="unused", **TEACHER)
  c.student.update(variant="custom", **STUDENT)
  c.distill.decoder.update(width=32, depth=1, num_heads=2)
  c.data.update(data_dir=tfds_dir and str(tfds_dir), num_workers=0)
  c.mesh.num_devices = 1  # end-to-end runs; 8 devices are tested on the loop
  c.update(TINY_RUN)
  for k, v in overrides.items():
    set_path(c, k, v)
  return c


def random_teacher(config):
  """A randomly initialised teacher, pruned like a loaded one."""
  spec_depth = config.teacher.depth
  full = distill.build_teacher(config, spec_depth)
  variables = jax.device_get(full.init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3))))
  return distill.build_teacher(config), distill.prune_teacher(variables, config)


class FixedBatches:
  """The same batch forever (no grain iterator to checkpoint)."""

  grain_iterator = None

  def __init__(self, batch):
    self.batch = batch

  def __iter__(self):
    return self

  def __next__(self):
    return self.batch


def random_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n, 32, 32, 3)).astype(np.float32)
  jitter = image + 0.1 * rng.normal(size=image.shape).astype(np.float32)
  return {"image": image, "image_student": jitter, "label": np.zeros((n,), np.int32)}


@pytest.fixture(scope="module")
def cifar_batch():
  """16 CIFAR-10 training images with the distillation augmentation."""
  from PIL import Image

  from mimdistill.data.transforms import DistillTrain

  root = shared_path("data", "cifar10", "train")
  files = [f for d in sorted(root.iterdir())[:8] for f in sorted(d.iterdir())[:2]]
  transform = DistillTrain(32)
  rng = np.random.default_rng(0)
  views = [transform(Image.open(f).convert("RGB"), rng) for f in files]
  return {k: np.stack([v[k] for v in views]) for k in ("image", "image_student")}


def leaves(tree):
  return dict(zip(jax.tree_util.tree_leaves(path_names(tree)), jax.tree_util.tree_leaves(tree)))


def compiled_steps(config, teacher, teacher_vars, batch, steps):
  """Runs `steps` optimizer steps of the stage's loss and optimizer; returns
  (per-step {'loss', components...}, first gradients, frozen patterns)."""
  student = distill.build_student(config)
  task = distill.build_task(config, student, teacher, teacher_vars, 100)
  variables = dict(task.init_variables(jax.random.PRNGKey(0)))
  params = variables.pop("params")
  tx = task.make_optimizer(params, task.schedule)

  @jax.jit
  def step(params, opt_state, rng):
    (loss, (parts, _)), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(
      params, variables, batch, rng, teacher_vars
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return dict(parts, loss=loss), grads, optax.apply_updates(params, updates), opt_state

  opt_state, metrics, first = tx.init(params), [], None
  for i in range(steps):
    m, grads, params, opt_state = step(params, opt_state, jax.random.PRNGKey(i))
    metrics.append({k: float(v) for k, v in m.items()})
    first = grads if first is None else first
  frozen = distill.frozen_patterns(distill.make_plan(config), config.student.depth)
  return metrics, first, frozen


# -----------------------------------------------------------------------------
# The shared loop: frozen params, a teacher never trained nor saved, sharding
# -----------------------------------------------------------------------------
def test_frozen_params_teacher_untouched_unsaved_and_8_devices_match_1(tmp_path):
  config = tiny_config(total_steps=3, **{"student.depth": 2})
  teacher, teacher_vars = random_teacher(config)
  before = copy.deepcopy(teacher_vars)
  student = distill.build_student(config)
  # lr 1e-4: the last block's key bias has a gradient that is exactly zero in
  # exact arithmetic (softmax is shift-invariant) and ~1e-10 rounding noise in
  # float32; Adam turns that noise into updates of up to lr per step, which
  # differ with the reduction order of 1 vs 8 devices.
  config.lr = 1e-4
  states = {}
  for n in (1, 8):
    task = distill.build_task(config, student, teacher, teacher_vars, 100)
    mesh = shard_lib.make_mesh(1, devices=jax.devices()[:n])
    states[n] = loop_lib.train(
      task,
      FixedBatches(random_batch()),
      tmp_path / str(n),
      loop_lib.LoopConfig(
        seed=config.seed,
        log_every=1,
        checkpoint_every=3,
        keep_checkpoints=3,
        async_checkpoints=False,
      ),
      mesh=mesh,
    ).state
  one, eight = (jax.device_get(states[n].params) for n in (1, 8))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one, eight)

  # Frozen student params: no update and no weight decay; all others move.
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  init = leaves(jax.device_get(task.init_variables(init_rng)["params"]))
  final = leaves(eight)
  frozen = distill.frozen_patterns(distill.make_plan(config), 2)
  is_frozen = lambda name: any(re.fullmatch(p, name) for p in frozen)
  frozen_names = [n for n in init if is_frozen(n)]
  assert sorted(frozen_names) == sorted(
    [
      f"encoder/blocks_1/{m}"
      for m in (
        "attn/proj/bias",
        "attn/proj/kernel",
        "mlp/fc1/bias",
        "mlp/fc1/kernel",
        "mlp/fc2/bias",
        "mlp/fc2/kernel",
        "norm2/bias",
        "norm2/scale",
      )
    ]
    + ["encoder/norm/bias", "encoder/norm/scale"]
  )
  for name in init:
    if is_frozen(name):
      np.testing.assert_array_equal(final[name], init[name], err_msg=name)
    else:
      assert not np.array_equal(final[name], init[name]), name
  # ... and no optimizer state (like a PyTorch param without grad).
  opt_paths = " ".join(
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(states[8].opt_state)[0]
  )
  assert "['encoder']['blocks_0']['mlp']['fc1']['kernel']" in opt_paths
  for name in frozen_names:
    assert "".join(f"['{k}']" for k in name.split("/")) not in opt_paths, name

  # The teacher: bit-identical after training, nowhere in the train state or
  # the checkpoint (its leaves are 64 wide, the student's 32).
  jax.tree_util.tree_map(np.testing.assert_array_equal, teacher_vars, before)
  teacher_shapes = {np.shape(x) for x in jax.tree_util.tree_leaves(teacher_vars)}
  teacher_shapes -= {()}
  state_shapes = {np.shape(x) for x in jax.tree_util.tree_leaves(states[8])}
  assert not teacher_shapes & state_shapes
  with ocp.CheckpointManager(
    workdir_lib.checkpoint_dir(tmp_path / "8"),
    options=ocp.CheckpointManagerOptions(read_only=True),
    item_handlers={"state": ocp.PyTreeCheckpointHandler()},
  ) as manager:
    meta = manager.item_metadata(3)["state"]
  meta = meta.tree if hasattr(meta, "tree") else meta
  saved = {tuple(getattr(x, "shape", ())) for x in jax.tree_util.tree_leaves(meta)}
  assert not teacher_shapes & saved
  assert set(meta["params"]) == {"encoder"}


def test_teacher_forward_stops_at_target_block():
  images = jnp.zeros((2, 32, 32, 3))
  counts = {}
  for block in (1, 2):
    config = tiny_config(**{"teacher.depth": 2, "teacher.block": block})
    teacher, variables = random_teacher(config)
    plan = distill.make_plan(config)
    assert sorted(k for k in variables["params"] if k.startswith("blocks_")) == [
      f"blocks_{i}" for i in range(block)
    ]
    assert ("norm" in variables["params"]) == (block == 2)
    jaxpr = str(
      jax.make_jaxpr(lambda v: distill.teacher_outputs(teacher, v, images, plan))(variables)  # noqa: B023
    )
    counts[block] = jaxpr.count("dot_general")
  # Block k: (k-1) full blocks of 6 matmuls (qkv, q.k, attn.v, proj, fc1,
  # fc2) + block k's qkv; nothing of block k+1.
  assert counts == {1: 1, 2: 7}


# -----------------------------------------------------------------------------
# Ablation targets
# -----------------------------------------------------------------------------
# Each component of a combined entry is checked on its own ('masked_mae':
# relations on a masked input + the MAE loss).
ABLATIONS = [
  "quickstart",
  "quickstart,qq_kk_vv,block1",
  "quickstart,no_softmax",
  "no_softmax_smooth_l1",
  "quickstart,cls",
  "quickstart,masked_mae",
] + [f"quickstart,feature_{f}" for f in tinymim_distill.FEATURES]


@pytest.mark.parametrize("arg", ABLATIONS)
def test_ablation_lowers_loss_and_freezes_exactly_the_unused(arg, cifar_batch):
  overrides = {"student.drop_path": 0.0}
  if "block1" in arg:
    overrides["teacher.depth"] = 2
  if arg == "no_softmax_smooth_l1":
    arg, overrides["distill.raw_loss"] = "quickstart,no_softmax", "smooth_l1"
  config = tiny_config(arg, **overrides)
  teacher, teacher_vars = random_teacher(config)
  metrics, grads, frozen = compiled_steps(config, teacher, teacher_vars, cifar_batch, steps=5)
  for name in metrics[0]:
    losses = [m[name] for m in metrics]
    assert np.isfinite(losses).all(), (name, losses)
    assert losses[-1] < losses[0], (name, losses)
  # The frozen set is exactly the params the target gives no gradient.
  zero = sorted(n for n, g in leaves(grads).items() if not np.any(g))
  named = sorted(n for n in leaves(grads) if any(re.fullmatch(p, n) for p in frozen))
  assert zero == named


# -----------------------------------------------------------------------------
# Errors before compiling
# -----------------------------------------------------------------------------
def test_config_errors():
  with pytest.raises(ValueError, match=r"teacher.block=2 is beyond the teacher's depth 1"):
    distill.validate(tiny_config(**{"teacher.block": 2}))
  with pytest.raises(ValueError, match=r"relation_heads=3 does not divide the teacher width 64"):
    distill.validate(tiny_config(**{"distill.relation_heads": 3}))
  with pytest.raises(ValueError, match=r"relation_heads=64 does not divide the student width 32"):
    distill.validate(tiny_config(**{"distill.relation_heads": 64}))
  with pytest.raises(ValueError, match=r"student image_size/patch_size 32/8 gives 16 patch tokens"):
    distill.validate(tiny_config(**{"student.patch_size": 8}))
  with pytest.raises(ValueError, match=r"teacher.source is empty"):
    distill.validate(tiny_config(**{"teacher.source": ""}))
  with pytest.raises(ValueError, match=r"unknown preset or modifier 'nope'"):
    tinymim_distill.get_config("quickstart,nope")


def test_teacher_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such workdir"):
    distill.load_teacher(tiny_config(**{"teacher.source": str(tmp_path / "x")}))
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    distill.load_teacher(tiny_config(**{"teacher.source": str(tmp_path)}))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    distill.load_teacher(tiny_config(**{"teacher.source": str(tmp_path / "t.pth")}))
  pth = shared_path("fixtures", "tinymim", "teacher.pth")
  # The fixture teacher is 64 wide with 6 blocks; the config says 1 block.
  with pytest.raises(
    ValueError,
    match=r"another architecture.*unexpected params/blocks_1; unexpected params/blocks_2",
  ):
    distill.load_teacher(tiny_config(**{"teacher.source": str(pth)}))


def test_presets_validate_and_quickstart_teacher_is_stage1_quickstart():
  for arg in (
    "quickstart",
    "cifar10",
    "b_from_l",
    "s_from_b",
    "t_from_s",
    "cls",
    "cifar10,feature_attn,block6",
    "t_from_s,masked_mae",
  ):
    c = tinymim_distill.get_config(arg)
    c.teacher.source = "somewhere"
    c.data.name = "embedded"
    c.batch_size = 8 * c.mesh.fsdp
    distill.validate(c)
  q = tinymim_distill.get_config("quickstart")
  m = mae_pretrain.get_config("quickstart").model
  for k in ("width", "depth", "num_heads", "patch_size", "image_size"):
    assert q.teacher[k] == m[k], k
  t = tinymim_distill.get_config("t_from_s")
  assert (distill.relation_heads(t), t.student.num_heads) == (12, 6)
  assert distill.teacher_block(tinymim_distill.get_config("b_from_l")) == 18
  assert distill.teacher_block(tinymim_distill.get_config("s_from_b")) == 12


# -----------------------------------------------------------------------------
# Teacher sources end to end
# -----------------------------------------------------------------------------
def test_official_pth_teacher_matches_official_losses():
  """The stage's loss with the fixture's official teacher and student equals
  the official code's, and exactly the official no-grad params are frozen."""
  folder = shared_path("fixtures", "tinymim")
  fx = json.loads((folder / "config.json").read_text())
  t, s = fx["teacher"], fx["student"]
  config = tiny_config(
    **{
      "teacher.source": str(folder / "teacher.pth"),
      "teacher.depth": t["depth"],
      "teacher.block": t["intermediate"],
      "student.width": s["embed_dim"],
      "student.depth": s["depth"],
      "student.num_heads": s["num_heads"],
      "student.drop_path": 0.0,
      "distill.relation_heads": s["last_heads"],
    }
  )
  distill.validate(config)
  teacher, teacher_vars, record = distill.load_teacher(config)
  assert record["kind"] == "pth" and record["path"].endswith("teacher.pth")
  student_vars, _ = official_to_flax(load_pth(folder / "student.pth").tensors, "vit")
  params = {"encoder": student_vars["params"]}
  model_state = {"fixed": {"encoder": student_vars["fixed"]}}
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  images = inputs["images"].transpose(0, 2, 3, 1)
  t_images = images
  if "teacher_images" in inputs:
    t_images = inputs["teacher_images"].transpose(0, 2, 3, 1)
  student = distill.build_student(config)
  plan = distill.make_plan(config)
  loss_fn = distill.make_loss_fn(plan, student, teacher)
  _, (losses, _) = jax.jit(loss_fn)(
    params,
    model_state,
    {"image": t_images, "image_student": images},
    jax.random.PRNGKey(0),
    teacher_vars,
  )
  np.testing.assert_allclose(losses["qk"], expected["qk_loss"], rtol=1e-4)
  np.testing.assert_allclose(losses["vv"], expected["vv_loss"], rtol=1e-4)
  frozen = distill.frozen_patterns(plan, s["depth"])
  names = official_names_of({"params": path_names(params)}, "classifier")
  frozen_official = sorted(
    off for off, flax_name in names.items() if any(re.fullmatch(p, flax_name) for p in frozen)
  )
  want = sorted(n for n in fx["params_without_grad"] if n != "pos_embed")
  assert frozen_official == want
  # A small student distils from that teacher (R = 4 at block 4 of 6).
  small = tiny_config(**{"student.drop_path": 0.0})
  small.teacher.update(config.teacher.to_dict())
  metrics, _, _ = compiled_steps(
    small, teacher, teacher_vars, {"image": t_images, "image_student": images}, 4
  )
  assert metrics[-1]["loss"] < metrics[0]["loss"], metrics


@pytest.fixture(scope="module")
def stage1_workdir(tfds_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("stage1")
  c = mae_pretrain.get_config("quickstart")
  c.model.update(**{k: TEACHER[k] for k in ("width", "depth", "num_heads")})
  c.model.decoder.update(width=32, depth=1, num_heads=2)
  c.data.update(data_dir=str(tfds_dir), num_workers=0)
  c.batch_size, c.total_steps, c.warmup_epochs, c.lr = 16, 2, 0.0, 1e-3
  c.log_every, c.checkpoint_every, c.async_checkpoints = 1, 2, False
  c.num_visualize = 2
  c.mesh.num_devices = 1
  pretrain.run(c, workdir)
  return workdir


def test_distill_from_stage1_then_sequential_link(stage1_workdir, tfds_dir, tmp_path):
  # Link 1: the stage-1 encoder -> student (R = 4 teacher heads).
  first = tmp_path / "link1"
  c1 = tiny_config(tfds_dir=tfds_dir, **{"teacher.source": str(stage1_workdir)})
  summary = distill.run(c1, first)
  assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
  lineage = json.loads((first / "lineage.json").read_text())
  assert lineage["stage"] == "distill"
  assert lineage["parent"]["step"] == 2
  assert lineage["parent"]["path"].endswith("checkpoints/2")
  assert lineage["parent"]["kind"] == "workdir"
  # The student's encoder restores by name as the next link's teacher.
  encoder, _ = restore_subtree(str(first), ("params", "encoder"))
  assert encoder["blocks_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
  # Link 2: that student (2 heads) -> a smaller one with R = 8 relation heads,
  # a head count neither model has (the official code cannot run this).
  second = tmp_path / "link2"
  c2 = tiny_config(
    tfds_dir=tfds_dir,
    total_steps=2,
    checkpoint_every=2,
    **{
      "teacher.source": f"{first}:3",
      "teacher.width": 32,
      "teacher.num_heads": 2,
      "student.width": 16,
      "student.num_heads": 1,
      "distill.relation_heads": 8,
    },
  )
  summary = distill.run(c2, second)
  assert np.isfinite(summary["final_loss"])
  parent = json.loads((second / "lineage.json").read_text())["parent"]
  assert parent["step"] == 3 and parent["source"] == f"{first}:3"
  # A stage-1 teacher config that does not match the checkpoint is refused.
  with pytest.raises(ValueError, match=r"another architecture.*config.json says: width=64"):
    distill.load_teacher(
      tiny_config(**{"teacher.source": str(stage1_workdir), "teacher.width": 128})
    )


def test_teacher_is_cast_once_and_a_scanned_teacher_stacked_once():
  """The frozen teacher's variables come in the compute dtype, and with
  teacher.scan_blocks its scanned blocks are one stacked subtree: same loss."""
  base = tiny_config(**{"teacher.depth": 3, "teacher.block": 3})
  teacher, plain = distill.random_teacher(base)
  assert {x.dtype for x in jax.tree_util.tree_leaves(plain)} == {np.dtype(np.float32)}
  scan = tiny_config(**{"teacher.depth": 3, "teacher.block": 3, "teacher.scan_blocks": True})
  scanned_teacher, scanned = distill.random_teacher(scan)
  assert "blocks_stacked" in scanned["params"] and "blocks_0" not in scanned["params"]
  assert scanned["params"]["blocks_stacked"]["mlp"]["fc1"]["kernel"].shape == (2, 64, 256)
  assert "blocks_2" in scanned["params"]  # the target block is read directly
  images = random_batch(4)["image"]
  plan = distill.make_plan(base)
  a = jax.jit(lambda v: distill.teacher_outputs(teacher, v, images, plan))(plain)
  b = jax.jit(lambda v: distill.teacher_outputs(scanned_teacher, v, images, plan))(scanned)
  for x, y in zip(a["qkv"], b["qkv"]):
    np.testing.assert_allclose(x, y, atol=1e-5)
  half = tiny_config(dtype="bfloat16")
  _, variables = distill.random_teacher(half)
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
