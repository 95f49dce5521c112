"""The CNN branch of the fine-tuning stage (`stages/finetune.py`): what
changes when the config's model section names a CNN family
(`configs/finetune.py:cnn_*` presets, `configs/common.py:cnn_section`).

SparK's ImageNet fine-tuning recipe (keyu-tian/SparK `downstream_imagenet`:
`arg.py` defaults, `util.create_model_opt`, `lr_decay.py`):
  * model: timm ResNet / official ConvNeXt, dense, with drop path
    (`factory.build('cnn_classifier', ...)`: the logits alone, timm names);
  * optimizer (`training/cnn_optimizer.py`): LAMB (timm 0.5.4, no bias
    correction, always adapting, no clipping: `max_grad_norm=1e7`) for
    ResNets, AdamW for ConvNeXts; per-parameter lr scale
    `layer_decay ** scale_exp` (`training/cnn_layer_decay.py`, SparK's rule
    for ResNet-50/101/152 and ConvNeXt, mimdistill's own rule for
    ResNet-18/34), weight decay 0 for 1-D params / biases / gammas;
  * schedule: SparK's (`spark_schedules.spark_lr`: linear warmup from 0.5%
    of the peak, cosine to 0.1% of it); weight decay constant; `min_lr` is
    not read;
  * loss (`config.loss`): 'bce' (timm `BinaryCrossEntropy` on the mixed,
    smoothed targets: SparK's with LAMB) or 'ce' (soft-target cross-entropy:
    SparK's with AdamW); mixup / cutmix / label smoothing / EMA / RandAugment
    come from the shared fine-tuning pipeline (SparK uses TrivialAugmentWide
    at < 384 px, which mimdistill does not have: RandAugment is used).

Init (`init.source`, `stages/cnn_sources.py`): a SparK / heterogeneous
workdir, a CNN fine-tuning workdir or a timm / SparK `.pth`; the classifier
(`fc`, ConvNeXt's `norm` + `head`) is kept only when its shapes fit. The
BatchNorm running statistics of the source are not carried over: in
training mode BatchNorm normalises with the batch's own statistics, and the
running ones (momentum 0.1) are re-estimated within the first few dozen
steps; they only matter for an evaluation before any step, which the loop
never runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mimdistill.models import cnn_zoo, factory
from mimdistill.stages.cnn_sources import CNN_HEADS, read_cnn
from mimdistill.stages.sources import shape_table
from mimdistill.training import cnn_optimizer
from mimdistill.training.spark_schedules import spark_lr

log = logging.getLogger("mimdistill")
LOSSES = ("bce", "ce")


def is_cnn(config) -> bool:
  """True when the model section names a CNN family."""
  return bool(config.model.get("family"))


@dataclasses.dataclass(frozen=True)
class CNNSpec:
  """What the fine-tune stage reads of a model spec, for a CNN."""

  fields: dict
  image_size: int
  in_chans: int = 3

  def kwargs(self) -> dict[str, Any]:
    return {**self.fields, "image_size": self.image_size}


def model_spec(config):
  """The validated model spec: `variants.resolve` for a ViT section, a
  `CNNSpec` (the CNN's fields checked, and the CNN recipe's) for a CNN."""
  if not is_cnn(config):
    from mimdistill.models import variants

    return variants.resolve(config.model)
  factory.build("cnn", config.model)  # unknown family / depth / variant / fields
  if config.mode != "finetune":
    raise ValueError(f"mode={config.mode!r}: a CNN model is fine-tuned only (mode='finetune')")
  if config.loss not in LOSSES:
    raise ValueError(f"loss={config.loss!r} is not one of {LOSSES}")
  cnn_optimizer.check(config.optimizer)
  return CNNSpec(cnn_zoo.fields_of_section(config.model), int(config.model.image_size))


def build_model(config, num_classes: int) -> cnn_zoo.CNNClassifier:
  return factory.build("cnn_classifier", config.model, num_classes=num_classes, dtype=config.dtype)


def abstract_params(model: cnn_zoo.CNNClassifier) -> dict:
  """The classifier's param shapes (a CNN's do not depend on the image size)."""
  dummy = jnp.zeros((1, 64, 64, 3))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]


def init_from_source(params: dict, config) -> tuple[dict, dict]:
  """The CNN's subtrees from `init.source` (host numpy; the classifier
  leaves only when their shapes fit `params`) and the lineage record."""
  source = config.init.source
  src = read_cnn(source)
  body = lambda tree: {k: v for k, v in tree.items() if k not in CNN_HEADS}
  want, got = shape_table(body(params)), shape_table(body(src.params))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or extra or wrong:
    lines = [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in wrong[:6]]
    lines += [f"missing {missing[:4]}"] if missing else []
    lines += [f"unexpected {extra[:4]}"] if extra else []
    fields = f" (its fields: {src.fields})" if src.fields else ""
    raise ValueError(
      f"init.source={source} is a CNN of another architecture than model "
      f"{cnn_zoo.fields_of_section(config.model)}{fields}: {'; '.join(lines)}. Set "
      "--config.model.* to the checkpoint's architecture."
    )
  new = {k: jax.tree_util.tree_map(np.asarray, src.params[k]) for k in body(params)}
  for name in CNN_HEADS:
    if name in params and name in src.params:
      if shape_table(src.params[name]) == shape_table(params[name]):
        new[name] = src.params[name]
        log.info("init: %s taken from %s", name, source)
      else:
        log.info("init: %s of %s does not fit the model: re-initialised", name, source)
  log.info("init: BatchNorm running statistics are re-estimated (train mode), not taken")
  return new, src.record


def schedule(config, total: int, warmup: int, peak: float) -> optax.Schedule:
  from mimdistill.stages.spark_pretrain import spark_warmup

  return spark_lr(peak, spark_warmup(warmup, total), total)


def make_optimizer(config, params, schedule) -> optax.GradientTransformation:
  o = config.optimizer
  return cnn_optimizer.from_config(
    params, schedule, o, weight_decay=o.weight_decay, layer_decay=o.layer_decay
  )


def loss(config, logits: jax.Array, targets: jax.Array) -> jax.Array:
  """'bce': timm BinaryCrossEntropy (mean over batch and classes); 'ce':
  soft-target cross-entropy (mean over the batch)."""
  logits = logits.astype(jnp.float32)
  if config.loss == "bce":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def synthetic_info(config, num_classes: int) -> dict:
  return {
    "image_size": int(config.model.image_size),
    "fused_attention": False,
    "remat": False,
    "scan_blocks": False,
    "model": f"CNN {cnn_zoo.fields_of_section(config.model)}, {num_classes} classes, "
    f"{config.optimizer.name}, {config.loss}",
  }
