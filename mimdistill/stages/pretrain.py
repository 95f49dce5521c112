"""Stage 1: MAE pre-training. Picks model, objective and data, then calls the
shared loop; at the end writes a reconstruction grid for a few eval images."""

from __future__ import annotations

import io
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mimdistill.data import input_pipeline, sources
from mimdistill.models import zoo
from mimdistill.models.mae import MAE
from mimdistill.objectives.mae_loss import mae_loss
from mimdistill.paths import as_path
from mimdistill.training import loop as loop_lib
from mimdistill.training import optimizer as opt_lib
from mimdistill.training import run_config, schedules
from mimdistill.training import sharding as shard_lib
from mimdistill.visualize import write_png_bytes

log = logging.getLogger("mimdistill")


def build_model(config: ml_collections.ConfigDict) -> MAE:
  spec = zoo.resolve(config.model)
  dec = config.model.decoder
  return MAE(
    width=spec.width,
    depth=spec.depth,
    num_heads=spec.num_heads,
    decoder_width=dec.width,
    decoder_depth=dec.depth,
    decoder_heads=dec.num_heads,
    patch_size=spec.patch_size,
    image_size=spec.image_size,
    in_chans=spec.in_chans,
    mlp_ratio=spec.mlp_ratio,
    drop_path=config.model.get("drop_path", 0.0),
    dtype=run_config.compute_dtype(config),
    fused_attention=config.model.get("fused_attention", False),
    remat=config.model.get("remat", False),
    scan_blocks=config.model.get("scan_blocks", False),
  )


def validate(config: ml_collections.ConfigDict) -> None:
  """Every check that can fail before data is read or anything compiles."""
  zoo.resolve(config.model)
  if not 0 < config.mask_ratio < 1:
    raise ValueError(f"mask_ratio={config.mask_ratio} must be in (0, 1); the MAE recipe uses 0.75")
  if config.model.image_size != config.data.image_size:
    raise ValueError(
      f"model.image_size={config.model.image_size} differs from "
      f"data.image_size={config.data.image_size}; set both alike"
    )
  sources.check_available(config.data.name, config.data.get("data_dir"))
  shard_lib.check_batch(config.batch_size, shard_lib.mesh_from_config(config))


def build_task(config, model: MAE, steps_per_epoch: int) -> loop_lib.Task:
  spec = zoo.resolve(config.model)
  total, warmup = run_config.steps(config, steps_per_epoch)
  lr = run_config.peak_lr(config)
  schedule = schedules.warmup_cosine(lr, config.min_lr, total, warmup)
  dummy = jnp.zeros((1, spec.image_size, spec.image_size, spec.in_chans))
  noise_shape = (spec.num_patches,)

  def init_variables(rng):
    return model.init({"params": rng}, dummy, jnp.zeros((1, *noise_shape)), config.mask_ratio)

  def loss_fn(params, fixed, batch, rng, inputs):
    images = batch["image"]
    mask_rng, drop_rng = jax.random.split(rng)
    noise = jax.random.uniform(mask_rng, (images.shape[0], *noise_shape))
    out = model.apply(
      {"params": params, "fixed": fixed},
      images,
      noise,
      config.mask_ratio,
      train=True,
      rngs={"drop_path": drop_rng},
    )
    loss = mae_loss(out.pred, images, out.masking.mask, spec.patch_size, config.norm_pix_loss)
    return loss, {}

  def make_optimizer(params, sched):
    o = config.optimizer
    return opt_lib.adamw(
      params,
      sched,
      b1=o.b1,
      b2=o.b2,
      weight_decay=o.weight_decay,
      clip_grad_norm=o.get("clip_grad_norm"),
      accumulate_steps=o.get("accumulate_steps", 1),
    )

  return loop_lib.Task(
    name="pretrain",
    init_variables=init_variables,
    loss_fn=loss_fn,
    make_optimizer=make_optimizer,
    schedule=schedule,
    total_steps=total,
    images_per_step=config.batch_size,
    signature={
      "stage": "pretrain",
      "model": spec.kwargs(),
      "decoder": config.model.decoder.to_dict(),
    },
  )


def save_reconstructions(
  model: MAE, variables, images: np.ndarray, config, path: epath.Path, seed: int = 0
) -> None:
  """PNG grid: rows of (original, masked input, reconstruction, reconstruction
  with visible patches pasted back), as in the MAE paper's figures."""
  from PIL import Image

  from mimdistill.data.transforms import denormalize
  from mimdistill.models.mae import patchify, unpatchify

  spec = zoo.resolve(config.model)
  p = spec.patch_size
  imgs = jnp.asarray(images)
  noise = jax.random.uniform(jax.random.PRNGKey(seed), (imgs.shape[0], spec.num_patches))
  out = jax.jit(lambda v, x, n: model.apply(v, x, n, config.mask_ratio))(variables, imgs, noise)
  pred = out.pred
  if config.norm_pix_loss:
    # Undo the per-patch normalisation with the true patch statistics so the
    # picture is comparable with the input.
    target = patchify(imgs, p)
    mean = target.mean(-1, keepdims=True)
    std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  mask = out.masking.mask[..., None]
  recon = unpatchify(pred, p, spec.in_chans)
  masked = unpatchify(patchify(imgs, p) * (1 - mask), p, spec.in_chans)
  pasted = unpatchify(patchify(imgs, p) * (1 - mask) + pred * mask, p, spec.in_chans)
  rows = []
  for i in range(imgs.shape[0]):
    tiles = [
      np.clip(denormalize(np.asarray(a[i])) * 255, 0, 255).astype(np.uint8)
      for a in (imgs, masked, recon, pasted)
    ]
    rows.append(np.concatenate(tiles, axis=1))
  grid = np.concatenate(rows, axis=0)
  scale = max(1, 256 // grid.shape[1] * 2)
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  buffer = io.BytesIO()
  img.save(buffer, format="PNG")
  write_png_bytes(buffer.getvalue(), path)


def run(config: ml_collections.ConfigDict, workdir, lineage: dict | None = None):
  """Runs (or resumes) stage 1 in `workdir`; returns a summary dict."""
  validate(config)
  workdir = as_path(workdir)
  model = build_model(config)
  mesh = shard_lib.mesh_from_config(config)
  train_data = input_pipeline.make_dataset(
    run_config.data_config(config, "mae"),
    split=config.data.train_split,
    train=True,
    seed=config.seed,
    mesh=mesh,
    data_axis=shard_lib.BATCH_AXES,
  )
  task = build_task(config, model, train_data.steps_per_epoch)
  state = loop_lib.train(
    task,
    iter(train_data),
    workdir,
    run_config.loop_config(config),
    mesh=mesh,
    config_dict=config.to_dict(),
    lineage=lineage or {"stage": "pretrain", "parent": None},
  )
  if jax.process_index() == 0:
    count = config.get("num_visualize", 8)
    n = jax.device_count()
    eval_data = input_pipeline.make_dataset(
      run_config.data_config(config, "eval", batch_size=-(-count // n) * n),
      split=config.data.eval_split,
      train=False,
      seed=config.seed,
    )
    images = next(iter(eval_data))["image"][:count]
    variables = {"params": jax.device_get(state.params), "fixed": jax.device_get(state.fixed)}
    png = workdir / "reconstructions.png"
    save_reconstructions(model, variables, images, config, png)
    log.info("wrote %s", png)
  return {"stage": "pretrain", "workdir": str(workdir), "steps": task.total_steps}
