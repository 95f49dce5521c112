"""Kind `seg_layer_decay`: per-parameter layer id, lr scale and weight decay
of TinyMIM's segmentation LayerDecayOptimizerConstructor, keyed by
segmentor names, for segmentors built from each case's config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop.mmseg_config import segmentor_config
from mimdistill.interop.segmentation_names import official_name
from mimdistill.models import factory
from mimdistill.training.segmentation_optim import param_groups


def check(folder, config, report):
  expected = np.load(folder / "expected.npz")
  for case in config["cases"]:
    key = case["key"]
    segmentor = {
      "backbone": case["segmentor_backbone"],
      "decode_head": case["decode_head"],
      "auxiliary_head": case.get("auxiliary_head"),
    }
    model = factory.build("segmentor", segmentor_config(segmentor))
    size = model.backbone.image_size
    images = jnp.zeros((2, size, size, model.backbone.in_chans))
    params = jax.eval_shape(lambda m=model, x=images: m.init(jax.random.PRNGKey(0), x))["params"]
    cfg = case["paramwise_cfg"]
    groups = param_groups(
      params,
      num_layers=int(cfg["num_layers"]),
      layer_decay_rate=float(cfg["layer_decay_rate"]),
      weight_decay=float(case["optimizer"]["weight_decay"]),
    )
    got = _by_official_name(groups)
    names = list(case["param_names"])
    differing = sorted(set(names) ^ set(got))
    report.check(
      folder.name, f"{key}/names", not differing, f"differing: {differing}" if differing else ""
    )
    common = [n for n in names if n in got]
    rows = [names.index(n) for n in common]
    for i, (field, tol) in enumerate((("layer_id", 0), ("lr_scale", 1e-12), ("weight_decay", 0))):
      report.compare(
        folder.name,
        f"{key}/{field}",
        np.asarray([got[n][i] for n in common], np.float64),
        np.asarray(expected[f"{key}/{field}"], np.float64)[rows],
        tol=tol,
      )


def _by_official_name(groups) -> dict[str, tuple]:
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(groups, is_leaf=lambda x: isinstance(x, tuple))[0]
  for path, value in flat:
    out[official_name([str(getattr(k, "key", k)) for k in path])] = value
  return out
