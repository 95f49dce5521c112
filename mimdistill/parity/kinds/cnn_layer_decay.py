"""Kind `cnn_layer_decay`: SparK's fine-tuning parameter groups (layer id,
lr scale, weight-decay scale per parameter, keyed by timm / official names)
for ResNets and ConvNeXts, the models SparK's rule refuses, and per-step lr
/ weight decay of SparK's pre-training and fine-tuning schedules.

Each model is built from its config entry (`family` plus timm's `name` or
`depths` / `dims` / `layers`), only its parameter shapes are evaluated
(`jax.eval_shape`, no compute), and the tables are computed on the Flax
tree by the functions the trainer uses (`training/cnn_layer_decay.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimdistill.interop import cnn_names
from mimdistill.models.cnn_zoo import build_cnn
from mimdistill.training import cnn_layer_decay as lrd
from mimdistill.training.spark_schedules import spark_lr, spark_weight_decay

MODEL_FIELDS = ("family", "name", "depth", "block", "layers", "div", "depths", "dims")
# Schedules are evaluated in float32 (as the training step does).
SCHEDULE_REL_TOL = 1e-6


def param_shapes(entry: dict):
  fields = {k: entry[k] for k in MODEL_FIELDS if k in entry}
  model = build_cnn(fields, num_classes=int(entry.get("num_classes", 1000)))
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]


def check_model(case, key, entry, want, report):
  params = param_shapes(entry)
  lr_scale = float(entry["lr_scale"])
  if entry.get("result", "table") != "table":
    # SparK's rule raises for this model; ours must refuse it the same way.
    try:
      lrd.layer_ids(params, rule="spark")
      refused = False
    except ValueError:
      refused = True
    report.check(case, f"{key}:spark_rule_refuses", refused, entry["result"])
    ids = lrd.layer_ids(params)  # our own rule still gives a table
    flat = [i for i, _ in jax.tree_util.tree_leaves(ids, is_leaf=lambda x: isinstance(x, tuple))]
    report.check(
      case, f"{key}:extended_rule_table", min(flat) == 0, f"layer ids {sorted(set(flat))}"
    )
    return
  is_pair = lambda x: isinstance(x, tuple)
  ids = cnn_names.named_leaves(lrd.layer_ids(params, rule="spark"), is_leaf=is_pair)
  scales = cnn_names.named_leaves(lrd.lr_scales(params, lr_scale, rule="spark"))
  wds = cnn_names.named_leaves(lrd.weight_decay_scales(params))
  differ = sorted(set(want) ^ set(ids))
  report.check(
    case, f"{key}:names", not differ, f"differing names: {differ[:20]}" if differ else ""
  )
  common = sorted(set(want) & set(ids))
  report.compare(
    case,
    f"{key}:layer_id",
    [ids[n][0] for n in common],
    [want[n]["layer_id"] for n in common],
    tol=0,
  )
  report.compare(
    case,
    f"{key}:scale_exp",
    [ids[n][1] for n in common],
    [want[n]["scale_exp"] for n in common],
    tol=0,
  )
  report.compare(
    case,
    f"{key}:lr_scale",
    [scales[n] for n in common],
    [want[n]["lr_scale"] for n in common],
    tol=1e-12,
  )
  report.compare(
    case,
    f"{key}:weight_decay_scale",
    [wds[n] for n in common],
    [want[n]["weight_decay_scale"] for n in common],
    tol=0,
  )
  if "num_layers" in entry:
    top = max(i for i, _ in jax.tree_util.tree_leaves(lrd.layer_ids(params), is_leaf=is_pair))
    report.check(case, f"{key}:num_layers", top + 1 == entry["num_layers"], f"max id {top}")


def check(folder, config, report):
  case = folder.name
  groups = config.get("param_groups", {})
  for key, entry in config.get("models", {}).items():
    check_model(case, key, entry, groups.get(key, {}), report)

  if not config.get("schedules"):
    return
  expected = np.load(folder / "expected.npz")
  for sched in config["schedules"]:
    iters, key = int(sched["iters"]), sched["key"]
    total = int(sched["ep"]) * iters
    lr = spark_lr(float(sched["peak_lr"]), float(sched["wp_ep"]) * iters, total)
    wd_end = sched.get("wd_end") if sched.get("which") == "pretrain" else None
    wd = spark_weight_decay(float(sched["wd"]), wd_end, total)
    steps = np.arange(len(expected[f"{key}/lr"]))
    lr_t = np.asarray(lr(steps), np.float64)
    wd_t = np.asarray(wd(steps), np.float64)
    # Two param groups: {lr_scale 1, wd scale 1} and {lr_scale_2, wd scale 0}.
    got_lr = np.stack([lr_t, lr_t * float(sched.get("lr_scale_2", 1.0))], axis=1)
    got_wd = np.stack([wd_t, wd_t * 0.0], axis=1)
    report.check(case, f"{key}:steps", len(steps) == total, f"{len(steps)} rows, ep*iters={total}")
    report.compare_relative(case, f"{key}/lr", got_lr, expected[f"{key}/lr"], SCHEDULE_REL_TOL)
    report.compare_relative(
      case, f"{key}/weight_decay", got_wd, expected[f"{key}/weight_decay"], SCHEDULE_REL_TOL
    )
