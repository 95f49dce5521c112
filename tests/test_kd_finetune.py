"""Knowledge-distillation fine-tuning and TinyMIM*-T: DeiT's two-head
classifier, the extra layer, DeiT's losses against numpy, KD teachers from
every kind of source and the errors before compiling, 8 devices (FSDP) ==
1 device with a frozen, unsaved teacher, one end-to-end stage-3 run with
KD, the dist-token student in stage 2, and the DeiT-named export (loaded
into timm's `VisionTransformerDistilled` where torch and timm exist).

Checkpoints are written without torch (`pth_writer`) with the official
names spelled out here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, TINY_RUN
from pth_writer import write_state_dict

from mimdistill.interop.conversion import convert, read_safetensors
from mimdistill.interop.official_names import flax_to_official
from mimdistill.interop.orbax_tree import restore_subtree
from mimdistill.models import factory
from mimdistill.models.pos_embed import resize_pos_embed
from mimdistill.objectives import kd_loss
from mimdistill.stages import distill, finetune
from mimdistill.training import loop as loop_lib
from mimdistill.training import sharding as shard_lib

sys.path.insert(0, str(REPO))
from configs import finetune as finetune_configs  # noqa: E402
from configs import pipeline as pipeline_configs  # noqa: E402
from configs import tinymim_distill  # noqa: E402

STUDENT = dict(variant="custom", width=32, depth=1, num_heads=2, patch_size=8, image_size=32)
TEACHER = dict(variant="custom", width=48, depth=1, num_heads=2, patch_size=8, image_size=32)
CLASSES = 10
IMAGES = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)


def kd_config(kd_type="hard", source="unused", **model):
  c = finetune_configs.get_config("quickstart_star")
  c.model.update(**{**STUDENT, "extra_width": 24, **model})
  c.kd.teacher.update(**TEACHER, source=str(source))
  c.kd.type = kd_type
  c.num_classes = CLASSES
  c.update(TINY_RUN, eval_batch_size=16, lr=1e-4)
  c.mesh.num_devices = 1
  return c


def official_classifier(d=48, depth=1, p=8, image=32, classes=CLASSES, pool="avg", dist=False):
  """Official state-dict shapes of MAE `models_vit` ('avg': fc_norm, no norm)
  or timm / DeiT ('cls': norm + head; `dist`: dist_token + head_dist)."""
  n = (image // p) ** 2 + (2 if dist else 1)
  s = {"cls_token": (1, 1, d), "pos_embed": (1, n, d)}
  if dist:
    s["dist_token"] = (1, 1, d)
  s.update({"patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)})
  for i in range(depth):
    b = f"blocks.{i}."
    s.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,)})
    s.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)})
    s.update({b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)})
    s.update({b + "norm2.weight": (d,), b + "norm2.bias": (d,)})
    s.update({b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,)})
    s.update({b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
  s.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,)} if pool == "avg" else {})
  s.update({"norm.weight": (d,), "norm.bias": (d,)} if pool == "cls" else {})
  if classes:
    s.update({"head.weight": (classes, d), "head.bias": (classes,)})
    if dist:
      s.update({"head_dist.weight": (classes, d), "head_dist.bias": (classes,)})
  rng = np.random.default_rng(len(s))
  return {k: (0.3 * rng.standard_normal(v)).astype(np.float32) for k, v in s.items()}


# -----------------------------------------------------------------------------
# The model
# -----------------------------------------------------------------------------
def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def _ln(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


@pytest.mark.parametrize("global_pool", [False, True])
def test_two_heads_pooling_and_extra_layer(global_pool):
  section = dict(STUDENT, dist_token=True, global_pool=global_pool, extra_width=24)
  model = factory.build("classifier", section, num_classes=CLASSES)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), IMAGES)
  params = jax.tree_util.tree_map(lambda x: x + 0.3, variables["params"])  # heads not ~0
  names = set(flax_to_official({"params": params}, "classifier"))
  assert {"dist_token", "head_dist.weight", "conv1x1.0.weight", "conv1x1.1.bias"} <= names
  assert ("fc_norm.weight" in names) == global_pool and ("norm.weight" in names) != global_pool
  assert params["encoder"]["pos_embed"].shape == (1, 2 + 16, 32)
  cls, dist = model.apply({"params": params}, IMAGES, train=True)
  np.testing.assert_allclose(
    model.apply({"params": params}, IMAGES), (cls + dist) / 2, rtol=1e-6, atol=1e-6
  )
  # The extra layer: LayerNorm(eps 1e-5) -> Linear -> erf GELU on every token.
  enc = model.encoder
  x = np.asarray(enc.apply({"params": params["encoder"]}, IMAGES), np.float64)
  n, f = params["conv1x1_0"], params["conv1x1_1"]
  y = _gelu(_ln(x, n["scale"], n["bias"], 1e-5) @ f["kernel"] + f["bias"])
  got = model.apply({"params": params}, IMAGES, method=model.tokens)
  np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5)  # eps: star_backbone parity
  if global_pool:  # 'token': head_dist on the dist token; 'avg': both heads on the pool
    pooled = _ln(y[:, 2:].mean(1), params["fc_norm"]["scale"], params["fc_norm"]["bias"], 1e-6)
    dtok = _ln(y[:, 1], params["fc_norm"]["scale"], params["fc_norm"]["bias"], 1e-6)
    head = lambda h, z: z @ params[h]["kernel"] + params[h]["bias"]
    np.testing.assert_allclose(cls, head("head", pooled), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dist, head("head_dist", dtok), rtol=1e-4, atol=1e-4)
    avg = factory.build("classifier", dict(section, dist_pool="avg"), num_classes=CLASSES)
    _, dist_avg = avg.apply({"params": params}, IMAGES, train=True)
    np.testing.assert_allclose(dist_avg, head("head_dist", pooled), rtol=1e-4, atol=1e-4)
  else:
    np.testing.assert_allclose(
      dist, y[:, 1] @ params["head_dist"]["kernel"] + params["head_dist"]["bias"], atol=2e-4
    )


def test_deit_losses_against_numpy():
  rng = np.random.default_rng(1)
  s_cls, s_dist, t = (rng.normal(size=(5, 7)).astype(np.float32) * 3 for _ in range(3))
  targets = rng.dirichlet(np.ones(7), size=5).astype(np.float32)
  logsm = lambda x: (
    x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
  )
  base = float(np.mean(np.sum(-targets * logsm(s_cls), 1)))
  for tau in (1.0, 3.0):
    lt, ls = logsm(t / tau), logsm(s_dist / tau)
    soft = float(np.sum(np.exp(lt) * (lt - ls)) * tau * tau / s_dist.size)  # B * C, not B
    hard = float(np.mean(-logsm(s_dist)[np.arange(5), t.argmax(1)]))
    for kd_type, kd in (("soft", soft), ("hard", hard)):
      loss, parts = kd_loss.distillation_loss(
        (s_cls, s_dist),
        targets,
        t,
        base=kd_loss.soft_target_cross_entropy,
        kd_type=kd_type,
        alpha=0.3,
        tau=tau,
      )
      np.testing.assert_allclose(parts["kd"], kd, rtol=1e-5)
      np.testing.assert_allclose(loss, base * 0.7 + kd * 0.3, rtol=1e-5)
  none, _ = kd_loss.distillation_loss(
    (s_cls, s_dist),
    targets,
    None,
    base=kd_loss.soft_target_cross_entropy,
    kd_type="none",
    alpha=0.3,
    tau=1.0,
  )
  np.testing.assert_allclose(none, base, rtol=1e-5)
  # A single-head student uses its one head for both terms (G2SD).
  single, parts = kd_loss.distillation_loss(
    s_cls, targets, t, base=kd_loss.soft_target_cross_entropy, kd_type="soft", alpha=0.5, tau=1.0
  )
  np.testing.assert_allclose(parts["kd"], kd_loss.soft_distillation(s_cls, t, 1.0), rtol=1e-6)
  with pytest.raises(ValueError, match="kd.type='mse'"):
    kd_loss.distillation_loss(
      s_cls, targets, t, base=kd_loss.cross_entropy, kd_type="mse", alpha=0.5, tau=1.0
    )


def test_init_resizes_pos_embed_keeping_both_special_rows(tmp_path):
  """A DeiT checkpoint at 16 px (grid 2) initialises a 32-px (grid 4) two-head
  model: rows 0 (cls) and 1 (dist) are kept, the patch rows resized."""
  state = official_classifier(d=32, image=16, pool="cls", dist=True)
  pth = write_state_dict(tmp_path / "deit.pth", state, wrap=None)
  c = kd_config("none", global_pool=False, extra_width=0)
  c.init.source = str(pth)
  model = finetune.build_model(c, CLASSES)
  new, record = finetune.init_from_source(finetune.abstract_params(model), c)
  pos = new["encoder"]["pos_embed"]
  assert pos.shape == (1, 18, 32)
  np.testing.assert_array_equal(pos[:, :2], state["pos_embed"][:, :2])
  np.testing.assert_array_equal(pos, resize_pos_embed(state["pos_embed"], 4, num_extra_tokens=2))
  np.testing.assert_array_equal(new["head_dist"]["kernel"], state["head_dist.weight"].T)
  np.testing.assert_array_equal(new["encoder"]["dist_token"], state["dist_token"])
  assert record["kind"] == "pth"


# -----------------------------------------------------------------------------
# Teachers: every source, and the errors before anything compiles
# -----------------------------------------------------------------------------
def test_kd_teacher_sources_and_errors(tmp_path):
  mae_ft = write_state_dict(tmp_path / "mae_ft.pth", official_classifier())  # models_vit
  c = kd_config(source=mae_ft)
  teacher, variables, record = finetune.load_kd_teacher(c, CLASSES)
  logits = np.asarray(jax.jit(teacher.apply)(variables, IMAGES))
  assert logits.shape == (4, CLASSES) and record["kind"] == "pth"

  # The same weights as a converted folder (a workdir), as its best/ and as
  # timm-named safetensors (CLS pooling there: norm + head).
  convert(mae_ft, tmp_path / "conv", num_heads=2)
  best = tmp_path / "run" / "best"
  with ocp.CheckpointManager(
    best, options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
  ) as manager:
    manager.save(
      7, args=ocp.args.Composite(params=ocp.args.StandardSave({"params": variables["params"]}))
    )
  for source in (tmp_path / "conv", best):
    got = finetune.load_kd_teacher(kd_config(source=source), CLASSES)
    np.testing.assert_allclose(jax.jit(teacher.apply)(got[1], IMAGES), logits, atol=1e-6)
  timm_state = official_classifier(pool="cls")
  timm_pth = write_state_dict(tmp_path / "timm.pth", timm_state, wrap=None)
  convert(timm_pth, tmp_path / "timm.safetensors", num_heads=2)
  c = kd_config(source=tmp_path / "timm.safetensors")
  c.kd.teacher.global_pool = False
  teacher, variables, record = finetune.load_kd_teacher(c, CLASSES)
  assert record["kind"] == "safetensors" and "norm" in variables["params"]["encoder"]

  # Errors, one line each, before compiling.
  with pytest.raises(ValueError, match="kd.teacher.source= a fine-tuned classifier"):
    finetune.validate(kd_config(source=""))
  with pytest.raises(ValueError, match="kd.type='bogus' is not one of"):
    finetune.validate(kd_config("bogus"), data=False)
  with pytest.raises(ValueError, match="classifies 5 classes but the model has 10"):
    five = write_state_dict(tmp_path / "five.pth", official_classifier(classes=5))
    finetune.load_kd_teacher(kd_config(source=five), CLASSES)
  with pytest.raises(ValueError, match="is not a classifier"):
    encoder = write_state_dict(tmp_path / "enc.pth", official_classifier(pool="cls", classes=0))
    finetune.load_kd_teacher(kd_config(source=encoder), CLASSES)
  with pytest.raises(
    ValueError, match=r"another architecture than kd.teacher.*qkv/kernel is \(48, 144\)"
  ):
    c = kd_config(source=mae_ft)
    c.kd.teacher.width = 64
    c.kd.teacher.num_heads = 4
    finetune.load_kd_teacher(c, CLASSES)
  with pytest.raises(ValueError, match="kd.teacher.image_size=64 differs"):
    c = kd_config()
    c.kd.teacher.image_size = 64
    finetune.validate(c, data=False)


# -----------------------------------------------------------------------------
# The loop: 8 devices with FSDP == 1 device; the teacher frozen, never saved
# -----------------------------------------------------------------------------
def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, n).astype(np.int32)
  soft = np.eye(CLASSES, dtype=np.float32)[labels] * 0.9 + 0.01
  return {
    "image": rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
    "label": labels,
    "label_soft": soft,
  }


def test_kd_8_devices_with_fsdp_match_1_and_teacher_is_frozen():
  c = kd_config("soft")
  model = finetune.build_model(c, CLASSES)
  teacher, teacher_vars = finetune.random_kd_teacher(c, CLASSES)
  before = jax.tree_util.tree_map(np.copy, teacher_vars)
  task = finetune.build_task(c, model, 100, teacher=teacher, teacher_variables=teacher_vars)
  params = {}
  for n, fsdp in ((1, 1), (8, 2)):
    mesh = shard_lib.make_mesh(fsdp, devices=jax.devices()[:n])
    prep = loop_lib.prepare(task, mesh, jax.random.PRNGKey(0))
    state = prep.init_state()
    for _ in range(3):
      state, metrics = prep.update(state, prep.place_batch(_batch()), prep.inputs)
    assert {"base_loss", "kd_loss"} <= set(metrics)
    params[n] = jax.device_get(state.params)
    # The teacher: bit-identical after the steps, sharded like params.
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(prep.inputs), before)
    qkv = prep.inputs["params"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert (shard_lib.FSDP in qkv.sharding.spec) == (fsdp > 1)
    assert set(state.params) == {
      "encoder",
      "conv1x1_0",
      "conv1x1_1",
      "fc_norm",
      "head",
      "head_dist",
    }
    assert 48 not in {np.shape(x)[-1] for x in jax.tree_util.tree_leaves(state) if np.ndim(x)}
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params[1], params[8]
  )


def test_kd_finetune_run_end_to_end(tfds_dir, tmp_path):
  """Stage 3 with hard KD from a `.pth` teacher into a single-head student
  (its one head takes both terms, as in G2SD): the teacher's top-1 is
  reported, the lineage names it, the checkpoint holds only the student."""
  pth = write_state_dict(tmp_path / "teacher.pth", official_classifier())
  c = kd_config("hard", source=pth, dist_token=False, extra_width=0)
  c.data.update(data_dir=str(tfds_dir), eval_split="test[:64]")
  c.init.source = ""
  c.figures = False
  summary = finetune.run(c, tmp_path / "ft")
  assert summary["kd_type"] == "hard" and 0 <= summary["kd_teacher_top1"] <= 1
  lineage = json.loads((tmp_path / "ft" / "lineage.json").read_text())
  assert lineage["kd_teacher"]["path"] == str(pth)
  metrics = [json.loads(l) for l in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
  assert any("kd_loss" in m for m in metrics)
  saved, _ = restore_subtree(str(tmp_path / "ft"), ("params",))
  assert set(saved) == {"encoder", "fc_norm", "head"}
  assert saved["encoder"]["cls_token"].shape == (1, 1, 32)


# -----------------------------------------------------------------------------
# Stage 2 into the dist-token student
# -----------------------------------------------------------------------------
def test_star_student_distillation():
  """Both `distill.dist_token` modes line the student's N + 2 tokens up with
  the teacher's N + 1; 'exclude' is also run (the dist token still learns
  through block 1), 'as_cls' traced (shapes only, no compile)."""
  c = tinymim_distill.get_config("quickstart,star")
  c.teacher.update(variant="custom", source="unused", width=64, depth=1, num_heads=4, patch_size=8)
  c.student.update(**{**STUDENT, "depth": 2, "num_heads": 4})
  c.update(TINY_RUN)
  batch = {"image": IMAGES, "image_student": IMAGES + 0.1, "label": np.zeros(4, np.int32)}
  for mode in ("exclude", "as_cls"):
    c.distill.dist_token = mode
    distill.validate(c, data=False)
    teacher, teacher_vars = distill.random_teacher(c)
    student = distill.build_student(c)
    task = distill.build_task(c, student, teacher, teacher_vars, 100)
    variables = dict(jax.eval_shape(task.init_variables, jax.random.PRNGKey(0)))
    plan = distill.make_plan(c)

    def aligned(s_vars, t_vars, teacher=teacher, student=student, plan=plan):
      t = distill.teacher_outputs(teacher, t_vars, IMAGES, plan)
      s = student.apply(s_vars, IMAGES, relation_heads=4)
      return t, distill.align_dist_token(plan, t, s)

    t, (t2, s2) = jax.eval_shape(aligned, variables, teacher_vars)
    tokens = 16 + (1 if mode == "exclude" else 2)
    assert t["qkv"][0].shape[2] == 17 and t2["qkv"][0].shape[2] == s2["qkv"][0].shape[2] == tokens
    grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
    params = variables.pop("params")
    args = (params, variables, batch, jax.random.PRNGKey(1), teacher_vars)
    if mode == "as_cls":
      jax.eval_shape(grad_fn, *args)
      x = jnp.arange(2 * 17.0).reshape(1, 1, 17, 2)  # the teacher's CLS is the dist token's target
      np.testing.assert_array_equal(distill._cls_twice(x, 2)[0, 0, :3], x[0, 0, [0, 0, 1]])
      continue
    real = dict(task.init_variables(jax.random.PRNGKey(0)))
    params = real.pop("params")
    (loss, (parts, _)), grads = jax.jit(grad_fn)(params, real, *args[2:])
    assert np.isfinite(loss) and set(parts) == {"qk", "vv"}
    assert np.any(np.asarray(grads["encoder"]["dist_token"]) != 0)


def test_presets_validate():
  for arg in ("imagenet_star", "quickstart_star"):
    p = pipeline_configs.get_config(arg)
    for name in p.stages.split(","):
      if name in p:
        module = distill if p[name].stage == "distill" else finetune
        if p[name].stage in ("distill", "finetune"):
          module.validate(p[name], data=False)
  star = finetune_configs.get_config("tiny_star")
  assert (star.model.num_heads, star.model.dist_token, star.model.extra_width) == (12, True, 1280)
  assert star.total_epochs == 1000 and star.kd.type == "hard"
  assert star.kd.teacher.source == "workdirs/imagenet/finetune"
  t = tinymim_distill.get_config("tstar_from_s")
  assert (t.student.variant, t.student.num_heads, t.student.dist_token) == ("tiny", 12, True)


# -----------------------------------------------------------------------------
# Export with DeiT's names; timm's VisionTransformerDistilled loads it
# -----------------------------------------------------------------------------
TIMM_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from safetensors.torch import load_file
    from safetensors import safe_open
    from timm.models.deit import VisionTransformerDistilled
    path, data = sys.argv[1], np.load(sys.argv[2])
    with safe_open(path, "pt") as f:
        m = json.loads(f.metadata()["mimdistill.model"])
    model = VisionTransformerDistilled(
        img_size=m["image_size"], patch_size=m["patch_size"], embed_dim=m["width"],
        depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"],
        num_classes=m["num_classes"], global_pool="token")
    result = model.load_state_dict(load_file(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data["images"])).numpy()
    err = float(np.abs(logits - data["logits"]).max())
    assert err <= 1e-5, err
    print("timm strict ok", err)
""")


def _torch_python() -> str | None:
  """An interpreter with torch and timm: $MIMDISTILL_TORCH_PYTHON (e.g. a
  throwaway venv) or this one when it has them (this session never imports
  torch itself)."""
  given = os.environ.get("MIMDISTILL_TORCH_PYTHON")
  if given:
    return given
  try:
    if importlib.util.find_spec("torch") and importlib.util.find_spec("timm"):
      return sys.executable
  except ValueError:
    pass
  return None


def test_two_head_export_has_deit_names_and_loads_in_timm(tmp_path):
  section = dict(STUDENT, dist_token=True, global_pool=False)
  model = factory.build("classifier", section, num_classes=CLASSES)
  params = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(3), IMAGES)["params"])
  params = jax.tree_util.tree_map(lambda x: x + 0.05, params)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(tmp_path / "orbax", {"params": params})
  report = convert(tmp_path / "orbax", tmp_path / "deit.safetensors", num_heads=2)
  assert report.spec.dist_token and report.spec.pooling == "cls"
  tensors, _ = read_safetensors(tmp_path / "deit.safetensors")
  assert list(tensors)[:3] == ["cls_token", "pos_embed", "dist_token"]  # timm's order
  assert {"head_dist.weight", "head_dist.bias", "norm.weight"} <= set(tensors)
  assert tensors["pos_embed"].shape == (1, 18, 32)
  # ... and back, bit for bit.
  convert(tmp_path / "deit.safetensors", tmp_path / "back", num_heads=2)
  back, _ = restore_subtree(str(tmp_path / "back"), ("params",))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # TinyMIM*-T's classifier (global pool, extra layer): detected and named,
  # back bit for bit (no timm class holds it: timm's distilled ViT pools tokens).
  star = factory.build(
    "classifier", dict(section, global_pool=True, extra_width=24), num_classes=10
  )
  star_params = jax.device_get(jax.jit(star.init)(jax.random.PRNGKey(4), IMAGES)["params"])
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(tmp_path / "star_orbax", {"params": star_params})
  report = convert(tmp_path / "star_orbax", tmp_path / "star.safetensors", num_heads=2)
  assert (report.spec.extra_width, report.spec.pooling, report.spec.dist_token) == (24, "avg", True)
  tensors, _ = read_safetensors(tmp_path / "star.safetensors")
  assert tensors["conv1x1.1.weight"].shape == (24, 32) and tensors["fc_norm.weight"].shape == (24,)
  convert(tmp_path / "star.safetensors", tmp_path / "star_back", num_heads=2)
  back, _ = restore_subtree(str(tmp_path / "star_back"), ("params",))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, star_params)

  python = _torch_python()
  if python is None:
    pytest.skip(
      "torch and timm are not importable (set MIMDISTILL_TORCH_PYTHON to a python that has them)"
    )
  logits = np.asarray(jax.jit(model.apply)({"params": params}, IMAGES))
  np.savez(tmp_path / "check.npz", images=IMAGES.transpose(0, 3, 1, 2), logits=logits)
  result = subprocess.run(
    [
      python,
      "-W",
      "ignore",
      "-c",
      TIMM_CHECK,
      str(tmp_path / "deit.safetensors"),
      str(tmp_path / "check.npz"),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "timm strict ok" in result.stdout
  print(result.stdout.strip())
