"""Kind `star_backbone`: TinyMIM*-T's segmentation backbone (tokens `[cls,
dist, patches]`, the 6-extra-entry relative position index, the extra
LayerNorm-Linear-GELU layer after block 11, the 4D-channel patch-16 necks)
in eval and train mode, from a checkpoint of the backbone alone
(`{'model': state_dict}`, names without the `backbone.` prefix)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop.mmseg_config import backbone_fields
from mimdistill.interop.pth_reader import load_pth
from mimdistill.interop.segmentation_names import mmcv_to_flax, official_tensors
from mimdistill.models import factory
from mimdistill.models import relative_position as relpos
from mimdistill.parity.kinds.segmentation import checkpoint_name, nchw, nhwc


def _fc_dim(config, tensors) -> int:
  if "conv1x1.1.weight" in tensors:
    return int(tensors["conv1x1.1.weight"].shape[0])
  for key, value in config.get("hard_coded_widths", {}).items():
    if key.startswith("1280"):
      return int(value)
  return 1280


def check(folder, config, report):
  case = folder.name
  tensors = load_pth(folder / checkpoint_name(folder, config)).tensors
  variables, _ = mmcv_to_flax({f"backbone.{k}": v for k, v in tensors.items()})
  fields = backbone_fields(config["backbone"], star=True)
  fields["fc_dim"] = _fc_dim(config, tensors)
  model = factory.build("segmentor", {**fields, "decode_head": {"num_classes": 1}}).backbone
  variables = {
    "params": variables["params"]["backbone"],
    "batch_stats": variables["batch_stats"]["backbone"],
  }
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  inputs = np.load(folder / "inputs.npz")
  expected = np.load(folder / "expected.npz")
  images = nhwc(inputs["images"])

  grid = (model.grid_size, model.grid_size)
  index = relpos.relative_position_index(grid, 2)
  report.compare(case, "relative_position_index", index, expected["relative_position_index"], tol=0)

  ev = jax.jit(lambda v, x: model.apply(v, x, train=False, method=model.intermediates))(
    variables, images
  )
  report.compare(case, "tokens_in", ev["tokens_in"], expected["tokens_in"])
  report.compare(case, "conv1x1_in", ev["conv1x1_in"], expected["conv1x1_in"])
  report.compare(case, "conv1x1_out", ev["conv1x1_out"], expected["conv1x1_out"])
  tr, state = jax.jit(
    lambda v, x: model.apply(v, x, train=True, method=model.intermediates, mutable=["batch_stats"])
  )(variables, images)
  for mode, out in (("eval", ev), ("train", tr)):
    for i, (x, y) in enumerate(zip(out["neck_in"], out["features"], strict=True)):
      report.compare(case, f"{mode}/neck_in/{i}", nchw(x), expected[f"{mode}/neck_in/{i}"])
      report.compare(case, f"{mode}/features/{i}", nchw(y), expected[f"{mode}/features/{i}"])
  stats = official_tensors({"backbone": state["batch_stats"]})
  for key in expected.files:
    if key.startswith("bn_after_train/"):
      name = "backbone." + key[len("bn_after_train/") :]
      tol = 0 if name.endswith("num_batches_tracked") else 1e-5
      if name not in stats:
        report.check(case, key, False, "no such BatchNorm buffer in mimdistill")
      else:
        report.compare(case, key, stats[name], expected[key], tol=tol)
