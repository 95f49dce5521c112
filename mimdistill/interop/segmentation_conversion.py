"""Conversion of whole segmentors (TinyMIM's mmseg UperNet):

    python -m mimdistill.convert upernet_tinymim_b.pth W/seg        # -> a workdir
    python -m mimdistill.convert W/seg upernet.safetensors         # -> mmcv names
    python -m mimdistill.convert W/seg upernet.pth                 # -> an mmcv checkpoint

(`conversion.convert` hands a source here when its names are a
segmentor's: `backbone.*` and `decode_head.*`.)

Sources: an mmcv checkpoint (`{'meta', 'state_dict'}`, read by the safe
`pth_reader`), a `.safetensors` file with those names, or a workdir whose
params are a segmentor's (a converted one, a stage-4 workdir).
Destinations:
  * a directory laid out as a workdir (`DST/checkpoints/0/state` =
    `{'params': {backbone, decode_head, auxiliary_head}, 'model_state':
    {'batch_stats': ...}}`, `model.json` with the detected model section
    for `factory.build('segmentor', ...)`, `config.json`, `lineage.json`),
    which the segment stage takes as `init.source`;
  * `*.safetensors`: the mmcv state dict (`segmentation_names.flax_to_mmcv`:
    BatchNorm buffers and the relative-position index buffers included, so
    it loads strictly in the official segmentor), in the source's tensor
    order when known;
  * `*.pth` (`.pt`, `.bin`): the same state dict as an mmcv checkpoint,
    `{'meta', 'state_dict'}`, written without torch.

The model section is read from the tensors (width, depth, patch and image
size, heads from the relative-position tables, layer scale, q/k/v biases,
the star neck, head channels, class count, auxiliary-head convs). What the
weights do not record is assumed and reported, with its flag:
`out_indices` (TinyMIM's (3, 5, 7, 11) at depth 12, (7, 11, 15, 23) at 24,
the end of each quarter otherwise: `--out_indices=3,5,7,11`), the head
count without relative-position tables (the standard one of the width:
`--num_heads`), the pyramid pooling scales (1, 2, 3, 6) with four modules,
the heads' input indices and dropout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mimdistill import workdir as workdir_lib
from mimdistill.interop import segmentation_names as names_lib
from mimdistill.models import variants
from mimdistill.models.segmentation_backbone import check_backbone

FORMAT = "mimdistill-converted-segmentor"
FORMAT_VERSION = 1
PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _is_segmentor(names: Sequence[str]) -> bool:
  names = list(names)
  return any(n.startswith("backbone.") for n in names) and any(
    n.startswith("decode_head.") for n in names
  )


def _workdir_params_roots(src: str) -> list[str] | None:
  from mimdistill.interop.orbax_tree import holds_checkpoints, saved_state

  path, _ = workdir_lib.parse_source(src)
  if not holds_checkpoints(path):
    return None
  try:
    tree = saved_state(src).tree
  except FileNotFoundError:
    return None
  return sorted((tree.get("params") or {}).keys()) if isinstance(tree, dict) else None


def handles(src, *, key: str | None = None) -> bool:
  """Whether SRC is a whole segmentor (see the module doc)."""
  src = os.fspath(src)
  path, _ = workdir_lib.parse_source(src)
  if path.is_dir():
    roots = _workdir_params_roots(src) or []
    return "backbone" in roots and "decode_head" in roots
  if not os.path.isfile(src):
    return False
  if src.endswith(".safetensors"):
    from mimdistill.interop.conversion import _header

    try:
      _, header = _header(src)  # the names alone; a damaged file is reported by the reader
    except Exception:
      return False
    return _is_segmentor([n for n in header if n != "__metadata__"])
  from mimdistill.interop.pth_reader import CheckpointReadError, load_pth

  try:
    return _is_segmentor(load_pth(src, key=key).tensors)
  except CheckpointReadError:
    return False


def default_out_indices(depth: int) -> tuple[int, ...]:
  if depth == 12:
    return (3, 5, 7, 11)
  if depth == 24:
    return (7, 11, 15, 23)
  return tuple(max(round(depth * k / 4) - 1, 0) for k in range(1, 5))


def detect(
  tensors: Mapping[str, Any],
  *,
  out_indices: Sequence[int] | None = None,
  num_heads: int | None = None,
  image_size: int | None = None,
) -> tuple[dict, list[str]]:
  """(the `factory.build('segmentor', ...)` section, notes on what was
  assumed) of an mmcv state dict's names and shapes."""
  shape = {n: tuple(np.shape(v)) for n, v in tensors.items()}
  notes: list[str] = []
  b = "backbone."
  if b + "cls_token" not in shape or b + "patch_embed.proj.weight" not in shape:
    raise ValueError(
      "the segmentor's backbone has no cls_token / patch_embed.proj.weight: not TinyMIM's "
      "ViT backbone"
    )
  width = shape[b + "cls_token"][-1]
  patch_w = shape[b + "patch_embed.proj.weight"]
  patch, in_chans = patch_w[-1], patch_w[1]
  depth = 1 + max(int(n.split(".")[2]) for n in shape if n.startswith(b + "blocks."))
  star = b + "dist_token" in shape or any(n.startswith(b + "conv1x1.") for n in shape)
  prefix = 2 if b + "dist_token" in shape else 1
  table = shape.get(b + "blocks.0.attn.relative_position_bias_table")
  if b + "pos_embed" in shape:
    grid = int(round((shape[b + "pos_embed"][1] - prefix) ** 0.5))
    detected_size = grid * patch
  elif table is not None:
    detected_size = names_lib._grid_of_table(table[0], prefix)[0] * patch
  else:
    detected_size = None
  if image_size is None:
    if detected_size is None:
      raise ValueError(
        "the backbone has neither pos_embed nor relative position tables: pass --image_size"
      )
    image_size = detected_size
  if num_heads is None:
    if table is not None:
      num_heads = table[1]
    else:
      num_heads = variants.STANDARD_HEADS.get(width)
      if num_heads is None:
        raise ValueError(f"width {width} has no standard head count: pass --num_heads")
      notes.append(
        f"num_heads={num_heads} is assumed from the standard width {width} (no relative "
        "position tables record it); pass --num_heads=N"
      )
  if out_indices is None:
    out_indices = default_out_indices(depth)
    notes.append(
      f"out_indices={list(out_indices)} is assumed (not stored in the weights); pass "
      "--out_indices=a,b,c,d"
    )
  qkv_bias = "fused"
  if b + "blocks.0.attn.q_bias" in shape:
    qkv_bias = "qv"
  elif b + "blocks.0.attn.qkv.bias" not in shape:
    qkv_bias = "none"
  section: dict[str, Any] = dict(
    variant="custom",
    width=width,
    depth=depth,
    num_heads=int(num_heads),
    patch_size=patch,
    image_size=int(image_size),
    in_chans=in_chans,
    mlp_ratio=shape[b + "blocks.0.mlp.fc1.weight"][0] / width,
    layer_scale=1.0 if b + "blocks.0.gamma_1" in shape else None,
    rel_pos_bias=table is not None,
    qkv_bias=qkv_bias,
    pos_embed_type="learned" if b + "pos_embed" in shape else "none",
    out_indices=[int(i) for i in out_indices],
    neck="tinymim_star" if star else "tinymim",
  )
  if b + "conv1x1.1.weight" in shape:
    section["fc_dim"] = shape[b + "conv1x1.1.weight"][0]
  # A section the segmentation stage cannot build (out_indices past the
  # depth) is refused here, not when a run first reads the converted folder.
  check_backbone(
    neck=section["neck"],
    patch_size=patch,
    image_size=section["image_size"],
    depth=depth,
    out_indices=section["out_indices"],
  )
  d = "decode_head."
  psp = sorted({int(n.split(".")[2]) for n in shape if n.startswith(d + "psp_modules.")})
  pool_scales = (1, 2, 3, 6) if len(psp) == 4 else tuple(range(1, len(psp) + 1))
  notes.append(
    f"decode_head.pool_scales={list(pool_scales)}, in_index and dropout are assumed (not "
    "stored in the weights)"
  )
  section["decode_head"] = dict(
    num_classes=shape[d + "conv_seg.weight"][0],
    channels=shape[d + "bottleneck.conv.weight"][0],
    pool_scales=list(pool_scales),
  )
  a = "auxiliary_head."
  if a + "conv_seg.weight" in shape:
    convs = sorted({int(n.split(".")[2]) for n in shape if n.startswith(a + "convs.")})
    kernel = shape[a + "convs.0.conv.weight"][-1] if convs else 3
    section["auxiliary_head"] = dict(
      num_classes=shape[a + "conv_seg.weight"][0],
      channels=shape[a + "conv_seg.weight"][1],
      num_convs=len(convs),
      kernel_size=kernel,
      concat_input=a + "conv_cat.conv.weight" in shape,
    )
  else:
    section["auxiliary_head"] = None
  return section, notes


@dataclasses.dataclass
class SegmentationConvertReport:
  src: str
  dst: str
  src_kind: str
  dst_kind: str
  model: dict
  used: list[str]
  skipped: dict[str, str]
  notes: list[str]

  def __str__(self) -> str:
    m = self.model
    lines = [
      f"source      {self.src} ({self.src_kind})",
      f"detected    UperNet segmentor: ViT width {m['width']}, depth {m['depth']}, "
      f"{m['num_heads']} heads, patch {m['patch_size']}, {m['image_size']} px, neck "
      f"{m['neck']}, out_indices {m['out_indices']}, {m['decode_head']['num_classes']} classes",
    ]
    lines += [f"note        {note}" for note in self.notes]
    lines.append(f"used        {len(self.used)} tensors")
    lines.append(f"skipped     {len(self.skipped) or 'nothing'}" + (":" if self.skipped else ""))
    lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
    lines.append(f"wrote       {self.dst} ({self.dst_kind})")
    return "\n".join(lines)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _read(src: str, key: str | None):
  """(kind, mmcv state dict (numpy), skipped, model section or None, order)."""
  path, _ = workdir_lib.parse_source(src)
  if path.is_dir():
    from mimdistill.interop.orbax_tree import is_best_dir, restore_subtree

    params, record = restore_subtree(src, ("params",))
    try:
      stats, _ = restore_subtree(src, ("model_state", "batch_stats"))
    except KeyError:
      stats = {}
    if is_best_dir(path):  # W/best: the records are the stage workdir's
      path = path.parent
    saved = workdir_lib.read_json(path, workdir_lib.MODEL) or {}
    section = saved.get("model") if saved.get("format") == FORMAT else None
    state = names_lib.flax_to_mmcv({"params": params, "batch_stats": stats})["state_dict"]
    if section is None:  # a stage-4 workdir: its config knows the out_indices
      config = (workdir_lib.read_json(path, workdir_lib.CONFIG) or {}).get("config") or {}
      indices = (config.get("model") or {}).get("out_indices")
      section = detect(state, out_indices=indices)[0]
    return "workdir", record["path"], state, {}, section, saved.get("tensor_order")
  if src.endswith(".safetensors"):
    from mimdistill.interop.conversion import read_safetensors

    tensors, _ = read_safetensors(src)
    return "safetensors", src, tensors, {}, None, list(tensors)
  from mimdistill.interop.pth_reader import load_pth

  ckpt = load_pth(src, key=key)
  return "pth", src, dict(ckpt.tensors), dict(ckpt.skipped), None, list(ckpt.tensors)


def _write_workdir(dst: str, variables: dict, section: dict, source: dict, order, overwrite):
  import orbax.checkpoint as ocp

  from mimdistill.interop.conversion import _handler

  final = pathlib.Path(dst).absolute()
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.with_name(final.name + f".partial-{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)
  try:
    with ocp.CheckpointManager(
      workdir_lib.checkpoint_dir(tmp),
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={"state": _handler()},
    ) as manager:
      state = {
        "params": variables["params"],
        "model_state": {"batch_stats": variables.get("batch_stats", {})},
      }
      manager.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
      manager.wait_until_finished()
    fields = ("width", "depth", "num_heads", "patch_size", "image_size", "mlp_ratio", "in_chans")
    signature = {"stage": "convert", "model": {k: section[k] for k in fields}}
    workdir_lib.write_json(tmp, workdir_lib.CONFIG, {"config": {}, "signature": signature})
    workdir_lib.write_json(
      tmp,
      workdir_lib.LINEAGE,
      {"stage": "convert", "parent": {"kind": source["kind"], "path": source["path"]}},
    )
    workdir_lib.write_json(
      tmp,
      workdir_lib.MODEL,
      {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": section,
        "step": 0,
        "source": source,
        "tensor_order": order,
      },
    )
    if final.exists():
      shutil.rmtree(final)
    os.rename(tmp, final)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def convert(
  src,
  dst,
  *,
  key: str | None = None,
  out_indices: Sequence[int] | None = None,
  num_heads: int | None = None,
  image_size: int | None = None,
  overwrite: bool = False,
  log: Callable[[str], None] | None = None,
) -> SegmentationConvertReport:
  """Converts a whole segmentor SRC into DST (see the module doc)."""
  from mimdistill.interop.conversion import (
    _check_destination,
    destination_kind,
    write_official_pth,
    write_safetensors,
  )

  say = log or (lambda _: None)
  src, dst = os.fspath(src), os.fspath(dst)
  dst_kind = destination_kind(dst)  # a .pth was written as an Orbax folder of that name
  _check_destination(dst, dst_kind != "orbax", overwrite)
  kind, location, state, skipped, section, order = _read(src, key)
  say(f"read {location} ({kind}): {len(state)} tensors")
  notes: list[str] = []
  if section is None or out_indices is not None or num_heads is not None:
    section, notes = detect(
      state, out_indices=out_indices, num_heads=num_heads, image_size=image_size
    )
  order = [n for n in (order or []) if n in state] + [n for n in state if n not in (order or [])]
  if dst_kind in ("safetensors", "pth"):
    tensors = {n: np.asarray(state[n]) for n in order}
    used = list(tensors)
    meta = {"mimdistill.segmentor": json.dumps(section), "mimdistill.source": location}
    if dst_kind == "safetensors":
      write_safetensors(dst, tensors, metadata={"format": "pt", **meta})
    else:  # mmcv's checkpoint layout, which mmseg's load_checkpoint reads
      write_official_pth(dst, tensors, wrap="state_dict", extra={"meta": meta})
  else:
    variables, report = names_lib.mmcv_to_flax({n: state[n] for n in order})
    skipped.update(report.skipped)
    _write_workdir(
      dst,
      variables,
      section,
      {"kind": kind, "path": os.path.abspath(location) if kind != "workdir" else location},
      order,
      overwrite,
    )
    used = report.used
  return SegmentationConvertReport(
    src=location,
    dst=dst,
    src_kind=kind,
    dst_kind=dst_kind,
    model=section,
    used=used,
    skipped=skipped,
    notes=notes,
  )
