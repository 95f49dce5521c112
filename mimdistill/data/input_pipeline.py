"""The input pipeline: a TFDS split -> grain -> global batches on the mesh.

    tfds data source (ArrayRecord, random access; no TensorFlow)
      train: -> shuffle(seed), a new permutation every epoch -> repeat
      eval:  -> padded with empty records to a multiple of the global batch
      -> map: PIL decode + augmentation, rng from (seed, stream position)
      -> this host's share: stream elements process_index::process_count
      -> batch(global batch / process count)
      -> train, augment 'finetune': Mixup/CutMix + soft targets on the host
         batch, rng from (seed, process index, batch index)
      -> worker processes (`num_workers`, 0 = in-process threads) -> prefetch
      -> `to_global`: one jax.Array per field, sharded over the data axis

Every random choice is a function of (seed, position in the global stream):
the same seed gives the same batches in the same order, whatever the number
of worker processes, and the union of all hosts' batch k is the same set of
examples for any number of hosts (for 'finetune', the examples before
mixing: pairs are formed inside each host's batch, as timm pairs inside each
GPU's).

Batches (B = global batch; host-local numpy arrays when `mesh` is None):
    train, augment 'mae':      {'image': f32[B,H,W,3], 'label': i32[B]}
    train, augment 'distill':  + 'image_student': f32[B,H,W,3] (same crop,
                               colour-jittered; 'image' is the teacher's view)
    train, augment 'finetune': + 'label_soft': f32[B,num_classes], the
                               smoothed one-hot targets, mixed with the
                               images by Mixup/CutMix when enabled ('image'
                               is the mixed batch; 'label' stays the hard
                               label of each row's first image)
    train, augment 'linprobe': {'image', 'label'} as 'mae'
    train, augment 'cae':      + 'patch_mask': bool[B,gh,gw], CAE v2's block
                               mask (True = masked), drawn per example like
                               the crop (see `cae_transforms`)
    eval (train=False):        + 'mask': f32[B], 1 for real examples, 0 for
                               padding; the last batch is padded, so every
                               example counts exactly once on any topology.
    segmentation (`data.segmentation_transforms`, mmseg's ADE20K pipelines):
      train, augment 'segment': {'image': f32[B,crop,crop,3], 'label':
                               i32[B,crop,crop]} (255 = ignored)
      eval, 'segment_eval':    {'image': f32[B,h,w,3] padded resized images,
                               'label': i32[B,lh,lw] original-size labels
                               padded with 255, 'img_shape', 'ori_shape':
                               i32[B,2], 'transposed': i32[B], 'mask': f32[B]}

Resuming the exact data stream. The iterator's position is a small JSON-able
dict (`it.get_state()` / `it.set_state(state)`). grain ships an Orbax handler
for it (`grain.checkpoint.CheckpointSave/CheckpointRestore`, one file per
process), so it goes into the training checkpoint next to the model:

    it = iter(make_dataset(config, split='train', train=True, mesh=mesh))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it.grain_iterator)))
    ...
    it = iter(make_dataset(config, split='train', train=True, mesh=mesh))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state),
        data=grain.checkpoint.CheckpointRestore(it.grain_iterator)))
    # `it` now continues with the batch after the one of `step`.
"""

import collections
import dataclasses
import json
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from mimdistill.data import (
  cae_transforms,
  finetune_transforms,
  segmentation_transforms,
  sources,
  transforms,
)
from mimdistill.data import mixup as mixup_lib
from mimdistill.data.block_masking import BlockMaskGenerator

AUGMENTS = ("mae", "distill", "eval", "finetune", "linprobe", "segment", "segment_eval", "cae")
SEGMENTATION_AUGMENTS = ("segment", "segment_eval")
_REQUIRED = object()


# ---------------------------------------------------------------------------
# Device placement
# ---------------------------------------------------------------------------
def to_global(batch: Any, mesh: Mesh, data_axis: str | tuple[str, ...] = "data"):
  """Host-local numpy batch tree -> global jax.Arrays sharded on `data_axis`.

  Each host passes its own rows; the global batch is their concatenation
  (over processes), split over the devices of the mesh's data axis.
  """
  sharding = NamedSharding(mesh, P(data_axis))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def data_parallelism(mesh: Mesh | None, data_axis: str | tuple[str, ...] = "data") -> int:
  """Number of devices a batch is split over (all devices without a mesh)."""
  if mesh is None:
    return jax.device_count()
  axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
  for axis in axes:
    if axis not in mesh.shape:
      raise ValueError(
        f"Mesh axes {tuple(mesh.shape)} have no data axis {axis!r}; pass data_axis=<one of them>."
      )
  return math.prod(mesh.shape[axis] for axis in axes)


# ---------------------------------------------------------------------------
# Per-example work (runs in the worker processes)
# ---------------------------------------------------------------------------
class _PaddedSource:
  """`source` followed by empty records up to `length` (eval padding).

  Padding is `{}` rather than None: grain treats None as a filtered-out
  element and would skip it.
  """

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    return self._source[index] if index < len(self._source) else {}

  def __repr__(self) -> str:
    return f"_PaddedSource({self._source!r}, length={self._length})"


@dataclasses.dataclass(frozen=True)
class _Preprocess:
  """(stream position, record) -> example dict; picklable for workers."""

  transform: transforms.Transform
  seed: int
  image_size: int
  image_key: str
  label_key: str
  with_mask: bool

  def __call__(self, index: int, record) -> dict[str, np.ndarray]:
    # A fresh generator per element makes each example's augmentation a pure
    # function of (seed, index): independent of workers, threads, resumption.
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, index]))
    if not record:  # Eval padding: a black image, masked out.
      example = self.transform(Image.new("RGB", (self.image_size, self.image_size)), rng)
      label, mask = 0, 0.0
    else:
      example = self.transform(sources.decode_image(record[self.image_key]), rng)
      label, mask = record[self.label_key], 1.0
    example["label"] = np.int32(label)
    if self.with_mask:
      example["mask"] = np.float32(mask)
    return example


def make_transform(config, augment: str) -> transforms.Transform:
  size = _get(config, "image_size")
  if augment == "mae":
    return transforms.MaeTrain(size, scale=_get(config, "crop_scale", (0.2, 1.0)))
  if augment == "distill":
    jitter = _get(config, "color_jitter", 0.4)
    return transforms.DistillTrain(
      size, scale=_get(config, "crop_scale", (0.2, 1.0)), jitter=(jitter, jitter, jitter)
    )
  if augment == "eval":
    return transforms.Eval(size, crop_pct=_get(config, "crop_pct", transforms.DEFAULT_CROP_PCT))
  if augment == "finetune":
    return finetune_transforms.FinetuneTrain(
      size,
      scale=_get(config, "finetune_crop_scale", (0.08, 1.0)),
      auto_augment=_get(config, "auto_augment", finetune_transforms.DEFAULT_AUTO_AUGMENT),
      color_jitter=_get(config, "finetune_color_jitter", None),
      re_prob=_get(config, "reprob", 0.25),
      re_mode=_get(config, "remode", "pixel"),
      re_count=_get(config, "recount", 1),
    )
  if augment == "linprobe":
    return finetune_transforms.LinprobeTrain(
      size, scale=_get(config, "finetune_crop_scale", (0.08, 1.0))
    )
  if augment == "cae":
    mask = BlockMaskGenerator(
      _get(config, "mask_grid"),
      _get(config, "num_masked"),
      _get(config, "mask_min_patches", 16),
      _get(config, "mask_max_patches", None),
      _get(config, "mask_min_aspect", 0.3),
    )
    return cae_transforms.CaeTrain(
      size,
      mask,
      scale=_get(config, "crop_scale", (0.4, 1.0)),
      jitter=_get(config, "color_jitter", 0.4),
    )
  raise ValueError(f"config.augment={augment!r} is not one of {AUGMENTS}.")


def make_mixup(config, num_classes: int | None) -> mixup_lib.Mixup:
  """The fine-tuning batch mixing of the data `config` (timm `Mixup`)."""
  num_classes = _get(config, "num_classes", None) or num_classes
  if not num_classes:
    raise ValueError(
      "augment='finetune' emits soft targets and needs the class count: "
      "set config.num_classes (the dataset has no ClassLabel)."
    )
  return mixup_lib.Mixup(
    num_classes=int(num_classes),
    mixup_alpha=_get(config, "mixup", 0.8),
    cutmix_alpha=_get(config, "cutmix", 1.0),
    cutmix_minmax=_get(config, "cutmix_minmax", None),
    prob=_get(config, "mixup_prob", 1.0),
    switch_prob=_get(config, "mixup_switch_prob", 0.5),
    mode=_get(config, "mixup_mode", "batch"),
    label_smoothing=_get(config, "label_smoothing", 0.1),
  )


@dataclasses.dataclass(frozen=True)
class _MixBatch:
  """(host-local batch index, batch) -> mixed batch; picklable for workers.

  The generator is a function of (seed, this host's index, batch index), so
  it is independent of workers and resumption. Its SeedSequence has a
  spawn key, which keeps it apart from the per-example streams.
  """

  mixup: mixup_lib.Mixup
  seed: int
  process_index: int

  def __call__(self, index: int, batch):
    rng = np.random.default_rng(
      np.random.SeedSequence([self.seed, self.process_index, index], spawn_key=(1,))
    )
    return self.mixup(batch, rng)


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------
class _Position:
  """The input position a checkpoint saves: the grain state after the last
  batch handed OUT (batches already prefetched onto the devices do not count),
  in the bytes form grain's Orbax handler writes and reads back."""

  def __init__(self, batches: "BatchIterator"):
    self._batches = batches

  def get_state(self) -> bytes:
    return json.dumps(self._batches.get_state(), indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self._batches.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass  # the next `next()` refills the queue


class BatchIterator(Iterator[Any]):
  """Iterator over batches with a checkpointable position.

  With a mesh, the next `device_prefetch` batches are already placed on the
  devices (the transfer overlaps the running step). `grain_iterator` is what
  `grain.checkpoint.CheckpointSave/Restore` takes: it saves the position after
  the last batch returned, not after the prefetched ones, so a resume
  continues the exact stream.
  """

  def __init__(
    self,
    grain_iterator,
    mesh: Mesh | None,
    data_axis: str | tuple[str, ...],
    device_prefetch: int = 1,
  ):
    self._source = grain_iterator
    self._mesh, self._data_axis = mesh, data_axis
    self._prefetch = device_prefetch if mesh is not None else 0
    self._queue: collections.deque = collections.deque()
    self._state = None
    self.grain_iterator = _Position(self)

  def _pull(self) -> bool:
    try:
      batch = next(self._source)
    except StopIteration:
      return False
    placed = batch if self._mesh is None else to_global(batch, self._mesh, self._data_axis)
    self._queue.append((placed, self._source.get_state()))
    return True

  def __next__(self):
    while len(self._queue) <= self._prefetch and self._pull():
      pass
    if not self._queue:
      # An exhausted (eval) pass releases its threads and processes now.
      self.close()
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> dict[str, Any]:
    """Position after the last batch returned (JSON-serialisable)."""
    return self._source.get_state() if self._state is None else self._state

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue after the batch at which `state` was taken."""
    self._queue.clear()
    self._source.set_state(state)
    self._state = state

  def close(self) -> None:
    """Stops worker processes now rather than at garbage collection."""
    self._queue.clear()
    self._source.close()


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A split's batches; iterate it for a `BatchIterator` (a fresh pass).

  Train pipelines repeat for `num_epochs` (None: forever); eval pipelines
  yield `steps_per_epoch` padded batches, then stop.
  """

  dataset: grain.IterDataset  # Host-local numpy batches.
  num_examples: int  # In the split (all hosts together).
  class_names: tuple[str, ...] | None
  global_batch_size: int
  local_batch_size: int
  steps_per_epoch: int  # Train: full batches per epoch; eval: batches.
  mesh: Mesh | None
  data_axis: str | tuple[str, ...]

  @property
  def num_classes(self) -> int | None:
    return None if self.class_names is None else len(self.class_names)

  def __iter__(self) -> BatchIterator:
    return BatchIterator(iter(self.dataset), self.mesh, self.data_axis)

  def first_batch(self):
    """The first batch, its iterator closed at once: an abandoned one is
    closed by the garbage collector, which can run in a grain worker thread
    and hang the interpreter's exit joining its own prefetch thread."""
    it = iter(self)
    try:
      return next(it)
    finally:
      it.close()


def _get(config, key: str, default=_REQUIRED):
  """config[key] for ConfigDicts and dicts alike; a clear error if missing."""
  value = config.get(key, default)
  if value is _REQUIRED:
    raise ValueError(
      f"The data config has no field {key!r}; set "
      f"config.{key} (fields: name, data_dir, image_size, "
      "batch_size, num_workers, augment, seed)."
    )
  return value


def check_loader_fields(config) -> None:
  """The loader's own fields (workers, threads, buffers) and the eval crop:
  a stage checks them with its config, before any stage of a pipeline runs
  (a negative buffer would otherwise fail inside grain, a crop_pct of 0 in
  the first evaluation)."""
  for field, what in (
    ("num_workers", "0 = augment in the training process"),
    ("read_threads", "0 = read in the calling thread"),
    ("prefetch", "batches kept ready; 0 = none"),
  ):
    value = _get(config, field, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"data.{field}={value!r} must be an integer >= 0 ({what})")
  crop_pct = _get(config, "crop_pct", None)
  if crop_pct is not None and not (isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1):
    raise ValueError(
      f"data.crop_pct={crop_pct!r} must be in (0, 1]: evaluation resizes to image_size / "
      "crop_pct, then center-crops (MAE / DeiT: 0.875)"
    )


def _validate(
  config,
  *,
  seed: int,
  mesh: Mesh | None,
  data_axis: str | tuple[str, ...],
  process_count: int,
  train: bool = True,
) -> None:
  """Every check that needs no dataset: fail before any preparation."""
  sources.check_name(_get(config, "name"))
  augment = _get(config, "augment")
  if augment not in AUGMENTS:
    raise ValueError(f"config.augment={augment!r} is not one of {AUGMENTS}.")
  size = _get(config, "image_size")
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f"config.image_size={size!r} must be a positive int.")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"The data seed {seed!r} must be an int >= 0.")
  check_loader_fields(config)
  if augment in ("finetune", "linprobe"):
    make_transform(config, augment)  # Parses and checks the recipe fields.
  if augment in SEGMENTATION_AUGMENTS:
    segmentation_transforms.preprocess_from_config(config, train=train, seed=seed)
  batch = _get(config, "batch_size")
  devices = data_parallelism(mesh, data_axis)
  if not isinstance(batch, int) or batch <= 0 or batch % devices:
    raise ValueError(
      f"config.batch_size={batch!r} (the global batch) must be a positive "
      f"multiple of the {devices} devices it is split over."
    )
  if batch % process_count:
    raise ValueError(
      f"config.batch_size={batch} (the global batch) must be divisible by "
      f"the {process_count} processes (hosts)."
    )
  if augment == "finetune" and train:
    mix = make_mixup(config, num_classes=1)  # Checks the mixing fields.
    if mix.active and (batch // process_count) % 2:
      raise ValueError(
        f"Mixup/CutMix pairs each host's batch with its reverse: "
        f"config.batch_size={batch} over {process_count} hosts gives an "
        "odd host batch; make it even."
      )


def _allow_unparsed_absl_flags() -> None:
  """Lets grain's multi-process iterator run outside `absl.app`.

  grain <= 0.2.18 reads one of its absl flags when starting worker processes
  and fails if flags were never parsed (google/grain#1355: pytest,
  notebooks, plain scripts). Marking them parsed keeps every flag at its
  default; a later `absl.app.run` still parses the command line.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(
  config,
  *,
  split: str,
  train: bool,
  seed: int | None = None,
  mesh: Mesh | None = None,
  data_axis: str | tuple[str, ...] = "data",
  process_index: int | None = None,
  process_count: int | None = None,
) -> Pipeline:
  """The batches of `split` for this host, per the data `config`.

  Args:
    config: `ml_collections.ConfigDict` (or dict) with fields
      name: 'embedded' | 'folder:<path>' | a TFDS name (see `sources`).
      data_dir: TFDS data dir (None: TFDS's default, $TFDS_DATA_DIR or
        ~/tensorflow_datasets); our own datasets are prepared into it once.
      image_size: output height = width.
      batch_size: the GLOBAL batch, over all hosts and devices.
      augment: 'mae' | 'distill' | 'eval'.
      num_workers: augmentation processes per host (0: in-process).
      seed (0): used when the `seed` argument is None.
      Optional: num_epochs (None = forever; train only), crop_scale
      ((0.2, 1.0)), color_jitter (0.4, distill), crop_pct (224/256, eval),
      image_key ('image'), label_key ('label'), read_threads (2),
      prefetch (2 batches).
      Fine-tuning ('finetune', timm 0.3.2 `create_transform` as MAE's
      main_finetune calls it; see `finetune_transforms`):
        finetune_crop_scale ((0.08, 1.0); also 'linprobe'),
        auto_augment ('rand-m9-mstd0.5-inc1'; None disables RandAugment),
        finetune_color_jitter (None; used only without auto_augment),
        reprob (0.25), remode ('pixel' | 'rand' | 'const'), recount (1):
          random erasing on the normalised image.
      Batch mixing ('finetune' train batches; timm `Mixup`, see `mixup`):
        mixup (0.8), cutmix (1.0): Beta alphas, both 0 = no mixing;
        cutmix_minmax (None), mixup_prob (1.0), mixup_switch_prob (0.5),
        mixup_mode ('batch'), label_smoothing (0.1), num_classes (None or
        0: the dataset's class count). Pairs are formed inside each host's
        batch (timm pairs inside each GPU's), which must be even.
      'linprobe' (MAE main_linprobe): MAE's single-draw RandomResizedCrop
      (finetune_crop_scale, bicubic) + flip only.
      'cae' (CAE v2 pre-training, `cae_transforms`): crop_scale ((0.4, 1.0)),
      color_jitter (0.4), and the block mask's mask_grid (patch rows), num_masked,
      mask_min_patches (16), mask_max_patches (None), mask_min_aspect (0.3).
    split: TFDS split ('train', 'test', 'train[:90%]', ...).
    train: shuffle + repeat + drop the remainder; otherwise one padded,
      masked pass in order.
    seed: shuffling and augmentation seed.
    mesh: place batches on it as global jax.Arrays; None: numpy batches.
    data_axis: the mesh axis (or axes) the batch is split over.
    process_index, process_count: this host's slot (default: JAX's); passed
      explicitly only to simulate several hosts.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if seed is None:
    seed = config.get("seed", 0)
  _validate(
    config, seed=seed, mesh=mesh, data_axis=data_axis, process_count=process_count, train=train
  )

  builder = sources.get_builder(
    _get(config, "name"), _get(config, "data_dir", None), _get(config, "bad_files", "refuse")
  )
  sources.ensure_prepared(builder)
  image_key = _get(config, "image_key", "image")
  segmentation = _get(config, "augment") in SEGMENTATION_AUGMENTS
  label_key = _get(config, "label_key", "annotation" if segmentation else "label")
  source = sources.open_split(builder, split, image_key)
  class_names = sources.class_names(builder, label_key)
  num_examples = len(source)
  global_batch = _get(config, "batch_size")
  local_batch = global_batch // process_count

  if train:
    num_epochs = _get(config, "num_epochs", None)
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
      raise ValueError(
        f"Split {split!r} has {num_examples} examples, fewer than one "
        f"global batch (config.batch_size={global_batch}); lower it."
      )
    # grain's shuffle draws a new global permutation for every epoch.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    if num_epochs is not None:
      # Whole global batches only, so every host yields as many batches.
      ds = ds[: num_examples * num_epochs // global_batch * global_batch]
  else:
    steps_per_epoch = -(-num_examples // global_batch)
    ds = grain.MapDataset.source(_PaddedSource(source, steps_per_epoch * global_batch))

  # Augment before taking this host's share, so that the rng is indexed by
  # the position in the global stream (the map is lazy: each host only
  # computes its own elements).
  if segmentation:
    preprocess = segmentation_transforms.preprocess_from_config(config, train=train, seed=seed)
  else:
    preprocess = _Preprocess(
      make_transform(config, _get(config, "augment")),
      seed=seed,
      image_size=_get(config, "image_size"),
      image_key=image_key,
      label_key=label_key,
      with_mask=not train,
    )
  ds = ds.map_with_index(preprocess)
  ds = ds[process_index::process_count]
  # Batching before `mp_prefetch` makes each worker produce whole batches,
  # so batch contents do not depend on the number of workers.
  ds = ds.batch(local_batch, drop_remainder=train)
  if train and _get(config, "augment") == "finetune":
    # Mixup/CutMix and the soft targets, on this host's batch.
    ds = ds.map_with_index(
      _MixBatch(
        make_mixup(config, class_names and len(class_names)), seed=seed, process_index=process_index
      )
    )

  prefetch = _get(config, "prefetch", 2)
  read_threads = _get(config, "read_threads", 2)
  # Threads augment whole batches (PIL releases the GIL); each needs a slot.
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch, read_threads))
  )
  workers = _get(config, "num_workers", 0)
  if workers > 0:
    _allow_unparsed_absl_flags()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
    )
  # A thread keeps `prefetch` batches ready while the step runs; grain's
  # iterator state still points just after the last batch handed out.
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)

  return Pipeline(
    dataset=ds,
    num_examples=num_examples,
    class_names=class_names,
    global_batch_size=global_batch,
    local_batch_size=local_batch,
    steps_per_epoch=steps_per_epoch,
    mesh=mesh,
    data_axis=data_axis,
  )
