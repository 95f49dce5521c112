"""The CAE v2 objective (Atten4Vis/CAE `furnace/engine_for_pretraining.py`,
model_type 'caev2', discrete_vae_type 'clip').

  targets  the frozen teacher's tokens on the WHOLE image (for CLIP: every
           token after `ln_post @ proj`, CLS first, patches in raster order),
           computed without gradient, reordered `[cls, visible, masked]` with
           the student's mask (`x[~mask]`, `x[mask]`, each in raster order)
           and L2-normalised without epsilon;
  loss     `F.cosine_embedding_loss(outputs, labels, ones, reduction='mean')`
           over all B x (1 + N) tokens: the mean of 1 - cos, CLS, visible
           and masked tokens weighted equally; torch's cosine adds 1e-12 to
           each squared norm: `x.y / sqrt((|x|^2 + 1e-12)(|y|^2 + 1e-12))`;
  metrics  the means over the CLS / visible / masked columns
           (`loss = (cls + N_vis visible + N_mask masked) / (1 + N)`).

The teacher is any function of images to tokens `(B, 1 + N, C)`: a CLIP
tower (`clip_teacher`), or a ViT encoder such as an MAE / TinyMIM stage-1
workdir's (`vit_teacher`, its tokens after the final norm). Its token grid
must be the student's and C the student's `out_dim`. The student sees the
image in its own normalisation (ImageNet's, `--imagenet_default_mean_and_std`
in every CAE v2 script); the teacher gets the same crop in the teacher's
normalisation (CLIP's): from `batch['teacher_images']` when the pipeline
provides it, otherwise renormalised from `batch['images']`.

Everything here is float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mimdistill.models.cae import CAEv2, fixed_variables, gather_tokens, mask_indices
from mimdistill.models.clip import CLIP_MEAN, CLIP_STD, ClipVisual, l2_normalize
from mimdistill.models.vit import ViTEncoder

PyTree = Any
TeacherFn = Callable[[PyTree, jax.Array], jax.Array]
# torch.nn.functional.cosine_embedding_loss's EPSILON on each squared norm.
COSINE_EPS = 1e-12


def renormalize(
  images: jax.Array,
  source: tuple[Sequence[float], Sequence[float]],
  target: tuple[Sequence[float], Sequence[float]],
) -> jax.Array:
  """NHWC images normalised with `source` (mean, std) -> with `target`."""
  (m0, s0), (m1, s1) = source, target
  m0, s0, m1, s1 = (jnp.asarray(np.asarray(v, np.float32)) for v in (m0, s0, m1, s1))
  return ((images.astype(jnp.float32) * s0 + m0) - m1) / s1


def reorder_targets(
  tokens: jax.Array, visible_index: jax.Array, masked_index: jax.Array
) -> jax.Array:
  """`[cls, tokens[~mask], tokens[mask]]` from teacher tokens `(B, 1+N, C)`."""
  patches = tokens[:, 1:]
  return jnp.concatenate(
    [tokens[:, :1], gather_tokens(patches, visible_index), gather_tokens(patches, masked_index)],
    axis=1,
  )


def cosine_per_token(outputs: jax.Array, labels: jax.Array) -> jax.Array:
  """torch's cosine of `cosine_embedding_loss`, per token: `(B, T)`."""
  x, y = outputs.astype(jnp.float32), labels.astype(jnp.float32)
  dot = jnp.sum(x * y, axis=-1)
  return dot / jnp.sqrt((jnp.sum(x * x, -1) + COSINE_EPS) * (jnp.sum(y * y, -1) + COSINE_EPS))


def check_teacher_tokens(teacher_tokens, student: CAEv2) -> None:
  """Shapes are static, so this raises at trace time with the fix."""
  want = 1 + student.num_patches
  if teacher_tokens.ndim != 3 or teacher_tokens.shape[1] != want:
    raise ValueError(
      f"the teacher gives tokens of shape {tuple(teacher_tokens.shape)} but the student has "
      f"1 + {student.num_patches} tokens ({student.grid_size}x{student.grid_size} patches of "
      f"{student.patch_size}px at {student.image_size}px): CAE v2 aligns token by token, so "
      "the teacher's image size / patch size must give the same grid as the student's"
    )
  if teacher_tokens.shape[2] != student.out_dim:
    raise ValueError(
      f"the teacher's tokens have {teacher_tokens.shape[2]} channels but the student's head "
      f"gives out_dim={student.out_dim}; set the student's out_dim to the teacher's width"
    )


def clip_teacher(tower: ClipVisual) -> TeacherFn:
  """Tokens after `ln_post @ proj`, CLS first (CAE's `extract_image_features`)."""
  return lambda variables, images: tower.apply(variables, images).tokens_proj


def vit_teacher(encoder: ViTEncoder) -> TeacherFn:
  """A ViT encoder's tokens after its final norm (an MAE / TinyMIM teacher)."""
  return lambda variables, images: encoder.apply(variables, images)


def cae_v2_terms(
  student: CAEv2,
  variables: PyTree,
  images: jax.Array,
  teacher_images: jax.Array,
  mask: jax.Array,
  num_masked: int,
  teacher_fn: TeacherFn,
  teacher: PyTree,
  *,
  rng: jax.Array | None = None,
  train: bool = False,
) -> dict[str, Any]:
  """Every quantity of one CAE v2 step (for the loss and for parity).

  `variables` are the student's `{'params', 'fixed'}`, `mask` `(B, N)` or
  `(B, gh, gw)` booleans (True = masked) with `num_masked` per image.
  """
  visible_index, masked_index = mask_indices(mask, num_masked)
  tokens = jax.lax.stop_gradient(teacher_fn(teacher, teacher_images).astype(jnp.float32))
  check_teacher_tokens(tokens, student)
  labels = l2_normalize(reorder_targets(tokens, visible_index, masked_index))
  rngs = {"drop_path": rng} if (train and rng is not None) else None
  out = student.apply(variables, images, visible_index, masked_index, train=train, rngs=rngs)
  cos = cosine_per_token(out.outputs, labels)
  per_token = 1.0 - cos
  n_vis = visible_index.shape[1]
  return {
    "out": out,
    "teacher_tokens": tokens,
    "labels": labels,
    "visible_index": visible_index,
    "masked_index": masked_index,
    "per_token_cos": cos,
    "per_token_loss": per_token,
    "loss": jnp.mean(per_token),
    "loss_cls": jnp.mean(per_token[:, 0]),
    "loss_visible": jnp.mean(per_token[:, 1 : 1 + n_vis]),
    "loss_masked": jnp.mean(per_token[:, 1 + n_vis :]),
  }


def make_loss_fn(
  student: CAEv2,
  teacher_fn: TeacherFn,
  *,
  num_masked: int,
  student_norm: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
  teacher_norm: tuple[Sequence[float], Sequence[float]] = (CLIP_MEAN, CLIP_STD),
  weight: float = 1.0,
) -> Callable:
  """`loss_fn(params, batch, rng, teacher, fixed=None) -> (loss, metrics)`.

  `batch`: 'images' NHWC (student normalisation), 'mask' booleans (True =
  masked, `num_masked` per image), optionally 'teacher_images' (teacher
  normalisation; else renormalised from 'images'). `teacher`: the frozen
  teacher's variables (differentiated never). `fixed`: the student's fixed
  collection (default: computed from the architecture). `weight` is
  `--latent_alignment_loss_weight` (1 in every CAE v2 script).
  """
  default_fixed = jax.tree_util.tree_map(jnp.asarray, fixed_variables(student))
  same_norm = all(
    np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64))
    for a, b in zip(student_norm, teacher_norm)
  )

  def loss_fn(params, batch, rng, teacher, fixed=None):
    images = batch["images"]
    teacher_images = batch.get("teacher_images")
    if teacher_images is None:
      teacher_images = images if same_norm else renormalize(images, student_norm, teacher_norm)
    terms = cae_v2_terms(
      student,
      {"params": params, "fixed": default_fixed if fixed is None else fixed},
      images,
      teacher_images,
      batch["mask"],
      num_masked,
      teacher_fn,
      teacher,
      rng=rng,
      train=True,
    )
    loss = weight * terms["loss"]
    metrics = {k: terms[k] for k in ("loss_cls", "loss_visible", "loss_masked")}
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn
