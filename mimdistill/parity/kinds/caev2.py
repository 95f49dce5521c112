"""Kind `caev2`: two CAE v2 pre-training steps of the official engine with a tiny
CLIP teacher, for stored block masks: every forward quantity (encoder latents,
projection, each regressor block, head outputs before / after L2 normalisation,
teacher tokens and targets, per-token cosine loss and its means), every gradient
of step 1 and the parameters that get none, the gradient norms, the parameters
after each AdamW step (official weight-decay groups, clipping, lr table), both
sin-cos tables, and the official block-mask generator (exactly, with Python's
`random`; by statistics with a numpy Generator)."""

from __future__ import annotations

import random
import re

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.data.block_masking import BlockMaskGenerator, mask_statistics
from mimdistill.interop.cae_names import cae_name, cae_to_flax, flax_to_cae
from mimdistill.interop.clip_names import clip_visual_to_flax
from mimdistill.interop.pth_reader import load_pth
from mimdistill.interop.torchscript_reader import read_torch_file
from mimdistill.models import factory
from mimdistill.models import pos_embed as pos_embed_lib
from mimdistill.models.cae import NO_GRAD_PARAMS, CAEv2
from mimdistill.models.clip import resize_positional_embedding
from mimdistill.objectives.cae_loss import cae_v2_terms, clip_teacher
from mimdistill.parity.kinds.clip_visual import check_dtypes
from mimdistill.parity.report import GRAD_REL_TOL
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import schedules

# Gradients that are mathematically zero (a key bias shifts every key of a
# softmax row equally); the fixture stores ~1e-10 rounding noise for them.
ZERO_GRADS = r"regresser\.regressor_blocks\.\d+\.norm1_k\.bias"


def student_from_official_args(args: dict) -> CAEv2:
  """CAEv2 from the official `ContextAutoencoderViT` constructor arguments."""
  eps = args.get("norm_layer_eps", 1e-6)
  if abs(eps - 1e-6) > 1e-12:
    raise ValueError(f"norm_layer_eps={eps}: CAE v2 models use LayerNorm eps 1e-6")
  if int(args.get("decoder_depth", 0)) != 0:
    raise ValueError(
      f"decoder_depth={args['decoder_depth']}: CAE v2 uses decoder_depth 0 (a LayerNorm + "
      "Linear head); CAE v1's decoder blocks are not implemented"
    )
  section = {
    "variant": "custom",
    "width": args["embed_dim"],
    "depth": args["depth"],
    "num_heads": args["num_heads"],
    "patch_size": args["patch_size"],
    "image_size": args["img_size"],
    "in_chans": args.get("in_chans", 3),
    "mlp_ratio": args.get("mlp_ratio", 4.0),
    "layer_scale": float(args.get("init_values") or 0.0),
    "qkv_bias": "qv" if args.get("qkv_bias", True) else "none",
    "drop_path": float(args.get("drop_path_rate", 0.0)),
    "init_std": float(args.get("init_std", 0.02)),
    "regressor": {
      "width": args["decoder_embed_dim"],
      "depth": args["regressor_depth"],
      "num_heads": args.get("decoder_num_heads", 12),
      "layer_scale": float(args.get("decoder_layer_scale_init_value", 0.1)),
    },
  }
  return factory.build("cae_v2", section, out_dim=args["num_out_dim"])


def load_teacher(folder, config, report, case):
  """The CLIP tower as `clip.modeling_clip.load(path, 'cpu', image_resolution)`
  builds it: shapes read from the weights, heads = width // 64, the position
  embedding resized (bilinear) when the resolution differs, float32."""
  teacher_args = config.get("teacher", {})
  names = [
    n
    for n in config.get("checkpoints", {})
    if ("clip" in n or "teacher" in n) and (folder / n).is_file()
  ]
  name = (names or sorted(p.name for p in folder.glob("*.pt")))[0]
  ckpt = read_torch_file(folder / name)
  dtypes = config.get("checkpoints", {}).get("teacher_dtypes")
  if dtypes:
    check_dtypes(case, report, ckpt.tensors, dtypes)
  params, spec, _, _ = clip_visual_to_flax(ckpt.tensors, what=name)
  resolution = int(teacher_args.get("second_input_size") or spec.image_size)
  if resolution != spec.image_size:
    params = dict(params)
    params["positional_embedding"] = resize_positional_embedding(
      params["positional_embedding"], resolution // spec.patch_size
    )
  tower = factory.build("clip_visual", spec.module_kwargs(image_size=resolution))
  return tower, jax.tree_util.tree_map(jnp.asarray, {"params": params})


def _nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _mask_generator(cfg: dict) -> BlockMaskGenerator:
  return BlockMaskGenerator(
    tuple(cfg["grid"]),
    cfg.get("num_masking_patches", cfg.get("num_mask_patches")),
    cfg.get("min_num_patches", cfg.get("min_mask_patches_per_block", 4)),
    cfg.get("max_num_patches", cfg.get("max_mask_patches_per_block")),
    cfg.get("min_aspect", 0.3),
    cfg.get("max_aspect"),
  )


def check_masks(case, config, inputs, expected, report):
  """Official masks reproduced exactly with Python's `random`; a numpy
  Generator's masks have the same statistics."""
  mask_cfg = config.get("mask")
  if mask_cfg and "seed" in mask_cfg:
    gen = _mask_generator(mask_cfg)
    if "repr" in mask_cfg:
      ok = repr(gen) == mask_cfg["repr"]
      report.check(case, "mask:repr", ok, "" if ok else repr(gen))
    rng = random.Random(mask_cfg["seed"])
    for key in ("bool_masked_pos", "bool_masked_pos_step2"):
      if key in inputs:
        ours = gen.batch(rng, len(inputs[key]))
        report.check(case, f"mask:{key}", np.array_equal(ours, inputs[key]))
  for size, cfg in sorted(config.get("mask_generator_samples", {}).items()):
    key = f"mask_generator/{size}"
    if key not in expected:
      continue
    official = expected[key]
    gen = _mask_generator(cfg)
    ok = repr(gen) == cfg.get("repr", repr(gen))
    report.check(case, f"{key}:repr", ok, "" if ok else repr(gen))
    ours = gen.batch(random.Random(cfg["python_random_seed"]), len(official))
    report.check(case, f"{key}:python_random_exact", np.array_equal(ours, official))
    freq_key = f"mask_generator_frequency/{size}"
    if freq_key in expected:
      report.compare(case, freq_key, official.mean(0), expected[freq_key], 1e-6)
    # Statistics of a numpy Generator's masks (another RNG, same process).
    sample = gen.batch(np.random.default_rng(0), 4 * len(official))
    want, got = mask_statistics(official), mask_statistics(sample)
    n = gen.num_masking_patches
    report.check(
      case,
      f"{key}:numpy_counts_exact",
      bool(np.all(got["counts"] == n) and np.all(want["counts"] == n)),
    )
    # Tolerances: a few standard errors of the official sample's means.
    for stat in ("regions", "region_sizes"):
      se = want[stat].std() / np.sqrt(len(want[stat])) + 1e-9
      report.compare(
        case, f"{key}:numpy_{stat}_mean_in_se", abs(got[stat].mean() - want[stat].mean()) / se, 0, 4
      )
    corr = np.corrcoef(got["frequency"].ravel(), want["frequency"].ravel())[0, 1]
    report.compare(case, f"{key}:numpy_frequency_1-corr", 1 - corr, 0, 0.1)


def check(folder, config, report):
  case = folder.name
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  student = student_from_official_args(config["student"])
  names = [n for n in config.get("checkpoints", {}) if n.endswith(".pth")]
  state = load_pth(folder / (names or ["caev2.pth"])[0]).tensors
  variables, conversion = cae_to_flax(state, fixed_gammas=not student.regressor_layer_scale > 0)
  report.check(
    case, "checkpoint:all_names_used", not conversion.skipped, str(conversion.skipped or "")
  )
  num_masked = int(config["mask"]["num_masked"])
  shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), t)
  n_vis = student.num_patches - num_masked
  template = jax.eval_shape(
    student.init,
    jax.random.PRNGKey(0),
    jnp.zeros((1, student.image_size, student.image_size, student.in_chans)),
    jnp.zeros((1, n_vis), jnp.int32),
    jnp.zeros((1, num_masked), jnp.int32),
  )
  report.check(case, "checkpoint:matches_model", shapes(template) == shapes(variables))
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  params, fixed = variables["params"], variables["fixed"]

  # The parameter sets of the official model.
  ours_trainable = sorted(flax_to_cae({"params": params}))
  report.check(
    case,
    "trainable_parameters",
    ours_trainable == sorted(config.get("trainable_parameters", ours_trainable)),
  )
  ours_frozen = sorted(flax_to_cae({"fixed": fixed}))
  report.check(
    case, "frozen_parameters", ours_frozen == sorted(config.get("frozen_parameters", ours_frozen))
  )
  grid = student.grid_size
  tables = {
    "encoder_pos_embed": (fixed["encoder"]["pos_embed"], student.width),
    "rd_pos_embed": (fixed["rd_pos_embed"], student.regressor_width),
  }
  for key, (loaded, dim) in tables.items():
    if key in expected:
      ours = pos_embed_lib.cae_sincos_2d(dim, grid)[None]
      report.compare(case, f"{key}:computed", ours, expected[key])
      report.compare(case, f"{key}:checkpoint", loaded, expected[key])

  check_masks(case, config, inputs, expected, report)

  tower, teacher = load_teacher(folder, config, report, case)
  teacher_fn = clip_teacher(tower)

  def terms_of(p, teacher_vars, step: str):
    return cae_v2_terms(
      student,
      {"params": p, "fixed": fixed},
      _nhwc(inputs[f"samples{step}"]),
      _nhwc(inputs[f"images{step}"]),
      jnp.asarray(inputs[f"bool_masked_pos{step}"]),
      num_masked,
      teacher_fn,
      teacher_vars,
      rng=jax.random.PRNGKey(0),
      train=True,
    )

  def loss_of(p, teacher_vars, step: str):
    terms = terms_of(p, teacher_vars, step)
    return terms["loss"], terms

  grad_fn = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True), static_argnums=2)
  (loss, terms), (grads, teacher_grads) = grad_fn(params, teacher, "")
  out = terms["out"]
  report.compare(case, "visible_index", terms["visible_index"], expected["visible_index"], 0)
  report.compare(case, "masked_index", terms["masked_index"], expected["masked_index"], 0)
  got = {
    "encoder_out": out.encoder_out,
    "regressor_out": out.regressor_out,
    "latent_predict": out.latent_predict,
    "head_logits": out.head_logits,
    "outputs": out.outputs,
    "clip_tokens": terms["teacher_tokens"],
    "labels": terms["labels"],
    "labels_visible": terms["labels"][:, 1 : 1 + n_vis],
    "labels_masked": terms["labels"][:, 1 + n_vis :],
    "per_token_cos": terms["per_token_cos"],
    "per_token_loss": terms["per_token_loss"],
    "loss": loss,
    "loss_main": loss,
    "loss_align": jnp.zeros(()),
    "loss_terms/cls_mean": terms["loss_cls"],
    "loss_terms/visible_mean": terms["loss_visible"],
    "loss_terms/masked_mean": terms["loss_masked"],
  }
  if student.projects:
    got["encoder_to_regresser_out"] = out.regressor_input
  got.update({f"regressor_block{i}_out": x for i, x in enumerate(out.regressor_blocks)})
  if "clip_tokens_ln_post" in expected:
    got["clip_tokens_ln_post"] = tower.apply(teacher, _nhwc(inputs["images"])).tokens_ln_post
  for key in sorted(got):
    if key in expected:
      report.compare(case, key, got[key], expected[key])
  for key in sorted(k for k in expected.files if k.startswith("regressor_block") and k not in got):
    report.check(case, key, False, "no such regressor block in mimdistill")
  teacher_max = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(teacher_grads))
  report.check(
    case,
    "teacher_parameters_with_grad",
    teacher_max == 0.0 and not config.get("teacher_parameters_with_grad"),
    f"max |teacher grad| {teacher_max}" if teacher_max else "",
  )

  # Gradients of step 1, by official name.
  grads_np = flax_to_cae({"params": jax.device_get(grads)})
  want = {k[len("grad/") :]: expected[k] for k in expected.files if k.startswith("grad/")}
  scale = max(float(np.max(np.abs(v))) for v in want.values())
  for name in sorted(want):
    if name not in grads_np:
      report.check(case, f"grad/{name}", False, "no such parameter in mimdistill")
    elif re.fullmatch(ZERO_GRADS, name):
      # Compared on the scale of all gradients: both are rounding noise.
      report.compare(case, f"grad/{name}", grads_np[name], want[name], GRAD_REL_TOL * scale)
    else:
      report.compare_relative(case, f"grad/{name}", grads_np[name], want[name])
  no_grad = sorted(_names_where(opt_lib.regex_mask(params, NO_GRAD_PARAMS)))
  listed = sorted(config.get("params_without_grad", no_grad))
  zero = all(not np.any(grads_np[n]) for n in no_grad)
  report.check(
    case,
    "params_without_grad",
    no_grad == listed and zero,
    ""
    if no_grad == listed and zero
    else f"mimdistill: {no_grad} (zero: {zero}); official: {listed}",
  )
  missing = sorted(set(grads_np) - set(want) - set(no_grad))
  report.check(
    case,
    "grad:every_parameter_compared",
    not missing,
    f"not in the fixture: {missing}" if missing else "",
  )
  if "grad_norm" in expected:
    report.compare_relative(case, "grad_norm", optax_global_norm(grads), expected["grad_norm"])

  check_optimizer(case, config, expected, report, params, grads, teacher, grad_fn)


def optax_global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def check_optimizer(case, config, expected, report, params, grads, teacher, grad_fn):
  """Weight-decay groups, the lr table and the AdamW steps of the engine."""
  groups = config.get("optimizer_param_groups")
  run = config.get("engine_run", {})
  sched = run.get("schedule_args", {})
  recipe = config.get("official_recipe", {}).get("pretraining_common", {})
  wd = float(recipe.get("weight_decay", 0.05))
  if groups:
    wd = max(float(g["weight_decay"]) for g in groups.values()) or wd
    decayed = set(_names_where(opt_lib.decay_mask(params)))
    ours = sorted(cae_name(p.split("/")) for p in _paths(params))
    report.check(
      case,
      "param_groups:names",
      sorted(groups) == ours,
      f"differing: {sorted(set(groups) ^ set(ours))}" if sorted(groups) != ours else "",
    )
    common = sorted(set(groups) & set(ours))
    report.compare(
      case,
      "param_groups:weight_decay",
      [wd if n in decayed else 0.0 for n in common],
      [float(groups[n]["weight_decay"]) for n in common],
      0,
    )
    # Pre-training has no layer-wise lr decay: every group's lr_scale is 1.
    report.compare(
      case,
      "param_groups:lr_scale",
      [1.0] * len(common),
      [float(groups[n]["lr_scale"]) for n in common],
      0,
    )
  if not sched or "lr_schedule" not in expected:
    return
  table = schedules.beit_cosine_values(
    float(sched["lr"]),
    float(sched["min_lr"]),
    int(sched["epochs"]),
    int(sched["niter_per_ep"]),
    int(sched.get("warmup_epochs", 0)),
  )
  report.compare(case, "lr_schedule", table, expected["lr_schedule"], 1e-12)
  if "wd_schedule" in expected:
    report.compare(case, "wd_schedule", np.full(len(table), wd), expected["wd_schedule"], 1e-12)
  start = int(sched.get("start_steps", 0))
  for i, key in enumerate(("lr_step1", "lr_step2")):
    if key in expected:
      report.compare(case, key, table[start + i], expected[key], 1e-12)

  clip = run.get("clip_grad")
  tx = opt_lib.adamw(
    params,
    schedules.from_values(table, offset=start),
    b1=0.9,
    b2=0.999,
    weight_decay=wd,
    frozen=NO_GRAD_PARAMS,
    clip_grad_norm=float(clip) if clip else None,
  )
  opt_state = tx.init(params)
  lrs = [float(table[start]), float(table[start + 1])]
  for step in (1, 2):
    if step == 2:
      (loss2, _), (grads, _) = grad_fn(params, teacher, "_step2")
      if "loss_step2" in expected:
        report.compare(case, "loss_step2", loss2, expected["loss_step2"])
      if "grad_norm_step2" in expected:
        report.compare_relative(
          case, "grad_norm_step2", optax_global_norm(grads), expected["grad_norm_step2"]
        )
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    after = flax_to_cae({"params": jax.device_get(params)})
    prefix = f"param_after_step{step}/"
    atol = 1e-2 * lrs[step - 1]
    noisy_atol = 2.0 * sum(lrs[:step])
    for key in sorted(k for k in expected.files if k.startswith(prefix)):
      name = key[len(prefix) :]
      if name not in after:
        report.check(case, key, False, "no such parameter in mimdistill")
      elif re.fullmatch(ZERO_GRADS, name):
        # Moved by lr * noise / (|noise| + eps): only the size is pinned.
        report.compare(case, key, after[name], expected[key], noisy_atol)
      else:
        report.compare(case, key, after[name], expected[key], atol)


def _paths(tree) -> list[str]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def _names_where(mask_tree) -> list[str]:
  """Official names of the leaves that are True in a boolean mask tree."""
  flat = jax.tree_util.tree_flatten_with_path(mask_tree)[0]
  return [cae_name([str(getattr(k, "key", k)) for k in path]) for path, m in flat if bool(m)]
