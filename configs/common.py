"""What every config file shares: the run fields of a stage and the one parser
of `preset[,modifier...]` arguments. Config files import this module and
ml_collections only, so reading a config never imports JAX, Orbax, grain or
optax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

Edit = Callable[[ml_collections.ConfigDict], None]
ParamEdit = Callable[[ml_collections.ConfigDict, str], None]


def stage_config(
  stage: str,
  preset: str,
  *,
  batch_size: int,
  total_epochs: float,
  warmup_epochs: float,
  base_lr: float,
  min_lr: float,
  optimizer: dict,
  data: dict,
) -> ml_collections.ConfigDict:
  """A stage config's shared fields, with the official ImageNet defaults;
  `optimizer` and `data` add the stage's own entries to those sections. The
  stage config then adds its model and method fields."""
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.preset = preset
  c.seed = 0
  c.dtype = "float32"  # compute dtype; 'bfloat16' on TPU/GPU
  c.batch_size = batch_size  # global, over all hosts and devices
  c.total_epochs = float(total_epochs)
  c.total_steps = 0  # > 0 overrides total_epochs
  c.warmup_epochs = float(warmup_epochs)
  c.base_lr = base_lr  # lr = base_lr * batch_size * accumulate_steps / 256
  c.lr = 0.0  # > 0 sets the peak lr directly
  c.min_lr = min_lr
  c.optimizer = ml_collections.ConfigDict(dict(clip_grad_norm=0.0, accumulate_steps=1, **optimizer))
  c.data = ml_collections.ConfigDict(
    dict(
      name="imagenet2012",
      data_dir=placeholder(str),
      train_split="train",
      eval_split="validation",
      image_size=224,
      num_workers=8,
      bad_files="refuse",  # folder: files that do not decode: 'refuse' (listed) or 'skip'
      **data,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1, num_devices=0))  # 0 = all devices
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.eval_every = 0  # > 0: evaluate every that many steps (stages that evaluate)
  return c


def model_section(variant: str, image_size: int = 224, **fields) -> ml_collections.ConfigDict:
  """A ViT model section: a named variant (or 'custom' with width, depth,
  num_heads, patch_size set) plus the family's options in `fields`."""
  return ml_collections.ConfigDict(
    dict(
      variant=variant,
      width=placeholder(int),
      depth=placeholder(int),
      num_heads=placeholder(int),
      patch_size=placeholder(int),
      image_size=image_size,
      mlp_ratio=4.0,
      **fields,
    )
  )


def cnn_section(family: str, image_size: int = 224, **fields) -> ml_collections.ConfigDict:
  """A CNN model section (`models/factory.py` kinds cnn, cnn_classifier,
  spark, hetero_student): `family` 'resnet' (timm `depth` 18/34/50/101/152)
  or 'convnext' (`variant` tiny/small/base/...), every width divided by
  `div`; `block`/`layers` or `depths`/`dims` override the named depth or
  variant. `fields` adds the family's options (drop_path, decoder_width, ...)."""
  section = dict(
    family=family,
    depth=placeholder(int),
    variant=placeholder(str),
    div=placeholder(int),  # ResNet only (default 1)
    block=placeholder(str),
    layers=placeholder(tuple),
    depths=placeholder(tuple),
    dims=placeholder(tuple),
    image_size=image_size,
  )
  section.update(fields)
  return ml_collections.ConfigDict(section)


def custom(section, width: int, depth: int, heads: int, patch: int, image: int) -> None:
  section.update(
    variant="custom", width=width, depth=depth, num_heads=heads, patch_size=patch, image_size=image
  )


def parse(
  arg: str,
  *,
  name: str,
  common: Callable[[str], ml_collections.ConfigDict],
  presets: Mapping[str, Edit],
  default: str,
  modifiers: Mapping[str, Edit] | None = None,
  prefixed: Mapping[str, ParamEdit] | None = None,
) -> ml_collections.ConfigDict:
  """`preset[,modifier,...]` -> a config: `common(arg)`, the preset's edit
  (`default` when the first part is not a preset), then each modifier in
  order. A modifier is a name in `modifiers`, or `<prefix><value>` for a
  prefix in `prefixed` (e.g. `block18`, `feature_attn`), whose edit gets the
  value. Anything else is an error that lists what the file knows."""
  parts = [p.strip() for p in (arg or default).split(",") if p.strip()]
  preset = parts[0] if parts and parts[0] in presets else default
  mods = parts[1:] if parts and parts[0] in presets else parts
  c = common(arg or default)
  presets[preset](c)
  modifiers, prefixed = modifiers or {}, prefixed or {}
  for mod in mods:
    if mod in modifiers:
      modifiers[mod](c)
      continue
    prefix = next((p for p in prefixed if mod.startswith(p) and len(mod) > len(p)), None)
    if prefix is None:
      known = ", ".join(presets)
      extra = [*modifiers, *(f"{p}<value>" for p in prefixed)]
      hint = f"; modifiers (after a preset, comma-separated): {', '.join(extra)}" if extra else ""
      raise ValueError(
        f"unknown preset or modifier {mod!r} in {arg!r} for {name}; presets: {known}{hint}"
      )
    try:
      prefixed[prefix](c, mod[len(prefix) :])
    except (KeyError, ValueError):
      raise ValueError(
        f"modifier {mod!r} in {arg!r} for {name}: bad value after {prefix!r}"
      ) from None
  return c
