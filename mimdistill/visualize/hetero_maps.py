"""Pictures of the CNN pre-training stages: SparK's `spark_reconstructions.png`
and the heterogeneous distillation's `hetero_maps.png`.

One row per eval image, the student in eval mode (running BatchNorm
statistics) on a SparK mask drawn from `seed`:
  * the image;
  * the masked input the sparse encoder sees (masked cells grey);
  * with the pixel loss, the reconstruction as SparK's `vis=True` shows it:
    the input where visible, the prediction de-normalised with each patch's
    own mean and std where masked;
  * with a teacher, the map of the student's per-token error against the
    whitened teacher tokens (the distillation's per-token loss, one cell per
    teacher patch), masked cells outlined, with the mean error over the
    masked and over the visible tokens.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mimdistill.data.transforms import denormalize
from mimdistill.models import sparse
from mimdistill.models.hetero import HeteroStudent
from mimdistill.objectives.hetero_loss import token_losses
from mimdistill.objectives.spark_loss import reconstruction_image
from mimdistill.visualize import new_figure, save_figure
from mimdistill.visualize.relation_maps import host_copy

MASKED_GREY = 0.5


def host_variables(state) -> dict:
  """`{'params', 'batch_stats', ...}` of a train state as host numpy (a
  collective on several hosts: every process calls it)."""
  return host_copy({"params": state.params, **state.model_state})


def _display(image: np.ndarray) -> np.ndarray:
  return np.clip(denormalize(np.asarray(image, np.float32)), 0.0, 1.0)


def student_outputs(
  model,
  variables,
  images,
  active,
  *,
  teacher=None,
  teacher_variables=None,
  loss: str = "smooth_l1",
  beta: float = 2.0,
) -> dict:
  """Reconstruction picture (or None) and per-token error `(B, g, g)` (or
  None) of a `SparK` or `HeteroStudent`."""

  @jax.jit
  def forward(v, x, a, tv):
    out = model.apply(v, x, a)
    spark_out = out.spark if isinstance(model, HeteroStudent) else out
    result = {}
    if spark_out.rec is not None:
      result["recon"] = reconstruction_image(spark_out.rec, x, a)
    if teacher is not None:
      t = teacher.apply(tv, x)[:, teacher.num_prefix_tokens :]
      err = token_losses(out.tokens, t, loss, beta)
      g = int(round(err.shape[1] ** 0.5))
      result["error"] = err.reshape(-1, g, g)
    return result

  return jax.device_get(forward(variables, jnp.asarray(images), active, teacher_variables))


def plot_student_maps(images, active, path, *, recon=None, error=None, title: str = ""):
  """The figure of the module docstring from arrays: `images` NHWC
  normalised, `active` `(B, f, f)`, `recon` NHWC or None, `error`
  `(B, g, g)` or None."""
  from matplotlib.patches import Rectangle

  images, active = np.asarray(images), np.asarray(active)
  b, size = images.shape[0], images.shape[1]
  visible = np.asarray(sparse.mask_at(jnp.asarray(active), size, size, jnp.float32))
  masked_in = _display(images) * visible + MASKED_GREY * (1 - visible)
  columns = [("image", _display(images)), ("masked input", masked_in)]
  if recon is not None:
    columns.append(("reconstruction", _display(recon)))
  cols = len(columns) + (error is not None)
  cell = 1.5
  fig = new_figure(cell * cols + (1.4 if error is not None else 0.2), cell * b + 1.0)
  axes = fig.subplots(b, cols, squeeze=False)
  vmax = float(np.max(error)) if error is not None else 1.0
  f = active.shape[-1]
  for i in range(b):
    for j, (name, pictures) in enumerate(columns):
      axes[i, j].imshow(pictures[i], interpolation="nearest")
      if i == 0:
        axes[i, j].set_title(name, fontsize=8)
    if error is not None:
      ax = axes[i, -1]
      g = error.shape[-1]
      im = ax.imshow(error[i], cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
      step = g / f
      for r in range(f):
        for c in range(f):
          if not active[i, r, c]:
            ax.add_patch(
              Rectangle(
                (c * step - 0.5, r * step - 0.5), step, step, fill=False, lw=1.0, ls="--", ec="cyan"
              )
            )
      cell_visible = np.repeat(np.repeat(active[i], g // f, 0), g // f, 1)
      masked_err = error[i][~cell_visible].mean() if (~cell_visible).any() else float("nan")
      visible_err = error[i][cell_visible].mean() if cell_visible.any() else float("nan")
      ax.set_xlabel(f"masked {masked_err:.3f}\nvisible {visible_err:.3f}", fontsize=7, labelpad=1)
      if i == 0:
        ax.set_title("error vs teacher tokens\n(masked cells dashed)", fontsize=8)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  if error is not None:
    fig.subplots_adjust(hspace=0.45)
    fig.colorbar(im, ax=axes[:, -1].tolist(), shrink=0.8, pad=0.1)
  fig.suptitle(title, fontsize=9)
  return save_figure(fig, path)


def save_student_maps(
  images,
  model,
  variables,
  path: str | os.PathLike,
  *,
  mask_ratio: float,
  seed: int = 0,
  teacher=None,
  teacher_variables=None,
  loss: str = "smooth_l1",
  beta: float = 2.0,
) -> epath.Path:
  """Draws a mask, runs the student (and teacher) and writes the figure."""
  images = np.asarray(images, np.float32)
  grid = sparse.grid_size(images.shape[1])
  active = sparse.random_active(jax.random.PRNGKey(seed), images.shape[0], grid, mask_ratio)
  out = student_outputs(
    model,
    variables,
    images,
    active,
    teacher=teacher,
    teacher_variables=teacher_variables,
    loss=loss,
    beta=beta,
  )
  kind = "heterogeneous student (CNN vs ViT teacher tokens)" if teacher is not None else "SparK"
  title = f"{kind}: {round(mask_ratio * 100)}% of the {grid}x{grid} cells masked"
  return plot_student_maps(
    images,
    np.asarray(active),
    path,
    recon=out.get("recon"),
    error=out.get("error"),
    title=title,
  )
