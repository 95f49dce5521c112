"""Dataset names -> prepared TFDS builders -> random-access data sources.

`config.name` takes one of three forms:

  * `'embedded'`: the procedural shapes dataset shipped in the package
    (`mimdistill_shapes`), generated on first use;
  * `'folder:<path>'`: a class-folder tree `<path>/<split>/<class>/*.jpg`,
    prepared on first use (one prepared copy per folder);
  * `'embedded_segmentation'`: the same shapes as scenes with per-pixel
    class maps (`mimdistill_shapes_seg`, `data.embedded_segmentation`);
  * `'ade20k:<root>'`: ADE20K's `ADEChallengeData2016` folder layout (or
    any image / annotation folder pair, `data.segmentation_folders`), and
    `'folder:<root>'` on such a layout, prepared on first use;
  * any TFDS name (`'imagenet2012'`, `'cifar10:3.0.2'`, `'scene_parse150'`, ...): must already be
    prepared in `array_record` format in the data dir. Preparing catalog
    datasets usually needs TensorFlow, so it is a separate, one-off step
    (see `_not_prepared_error`); reading never does.

Records are read with `tfds.data_source` (ArrayRecord random access); the
image feature is returned as its encoded bytes and decoded with PIL, never by
TensorFlow.
"""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import file_adapters

from mimdistill.data import (
  class_folder,
  embedded_segmentation,
  embedded_shapes,
  local_builder,
  segmentation_folders,
)

EMBEDDED = "embedded"
_CURRENT: set = set()  # prepared folder copies found current in this process
EMBEDDED_SEGMENTATION = "embedded_segmentation"
FOLDER_PREFIX = "folder:"
ADE20K_PREFIX = "ade20k:"


def check_name(name: str) -> None:
  """Cheap validation of a dataset name (no builder, no I/O beyond a stat)."""
  if not isinstance(name, str) or not name:
    raise ValueError(
      f"Dataset name {name!r} is not a string; use 'embedded', "
      "'folder:<path>' or a TFDS dataset name."
    )
  if not name.startswith(FOLDER_PREFIX) and (
    name.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(name))
  ):
    raise ValueError(
      f"Dataset name {name!r} looks like a folder; a folder of class folders is "
      f"'folder:{name}' (<path>/<split>/<class>/*.jpg)."
    )
  if name.startswith(FOLDER_PREFIX):
    root = name[len(FOLDER_PREFIX) :]
    if not os.path.isdir(root):
      raise FileNotFoundError(
        f"Dataset folder {root!r} (from name {name!r}) does not exist; "
        f"pass 'folder:<path>' with <path>/<split>/<class>/*.jpg."
      )
  if name.startswith(ADE20K_PREFIX):
    root = name[len(ADE20K_PREFIX) :]
    if not os.path.isdir(root):
      raise FileNotFoundError(
        f"Dataset folder {root!r} (from name {name!r}) does not exist; "
        + segmentation_folders.EXPECTED_LAYOUT
      )


def get_builder(
  name: str, data_dir: str | None, bad_files: str = "refuse"
) -> tfds.core.DatasetBuilder:
  """The TFDS builder that `name` refers to; prepares nothing. A folder's
  prepared copy that no longer matches the folder is deleted here (and
  prepared again on use); `bad_files` ('refuse' | 'skip') is what preparing
  a folder does with files that do not decode."""
  check_name(name)
  kwargs = {"data_dir": data_dir}
  if name == EMBEDDED:
    return embedded_shapes.ShapesBuilder(file_format=local_builder.FILE_FORMAT, **kwargs)
  if name == EMBEDDED_SEGMENTATION:
    return embedded_segmentation.SegShapesBuilder(file_format=local_builder.FILE_FORMAT, **kwargs)
  segmentation_root = None
  if name.startswith(ADE20K_PREFIX):
    segmentation_root = name[len(ADE20K_PREFIX) :]
  elif name.startswith(FOLDER_PREFIX) and segmentation_folders.has_layout(
    name[len(FOLDER_PREFIX) :]
  ):
    segmentation_root = name[len(FOLDER_PREFIX) :]
  if segmentation_root is not None:
    return segmentation_folders.SegFolderBuilder(
      config=segmentation_folders.config_for(segmentation_root),
      file_format=local_builder.FILE_FORMAT,
      **kwargs,
    )
  if name.startswith(FOLDER_PREFIX):
    make = lambda: class_folder.ClassFolderBuilder(
      config=class_folder.config_for(name[len(FOLDER_PREFIX) :], bad_files),
      file_format=local_builder.FILE_FORMAT,
      **kwargs,
    )
    builder = make()
    key = (os.fspath(builder.data_dir), bad_files)
    if key not in _CURRENT and builder.is_prepared() and not builder.is_current():
      builder.discard()
      builder = make()
    _CURRENT.add(key)  # checked once per process: a run reads the folder as it began
    return builder
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"Unknown dataset name {name!r}: use 'embedded', 'embedded_segmentation', "
      "'folder:<path>', 'ade20k:<path>' or a TFDS dataset name (see tfds.list_builders())."
    ) from None
  except ValueError as e:
    if "builder name string" not in str(e):
      raise
    raise ValueError(
      f"Dataset name {name!r} is not a TFDS name (dataset[/config][:version]); use "
      "'embedded', 'folder:<path>' or a TFDS dataset name."
    ) from None


def ensure_prepared(builder: tfds.core.DatasetBuilder) -> None:
  """Prepares mimdistill's own datasets; checks that others are readable."""
  if isinstance(builder, local_builder.LocalBuilder):
    builder.prepare()
    return
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_error(builder))
  formats = builder.info.available_file_formats()
  if not formats & file_adapters.FileFormat.with_random_access():
    raise ValueError(
      f"TFDS dataset {builder.info.full_name!r} at {builder.data_dir} is "
      f"prepared only as {sorted(f.value for f in formats)}, which cannot "
      "be read with random access. Convert it once (needs TensorFlow): "
      f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
      "--out_file_format=array_record`."
    )


def check_available(name: str, data_dir: str | None, bad_files: str = "refuse") -> None:
  """Fails fast (before any training is set up) on an unknown dataset name,
  a missing folder, or a TFDS dataset that is not prepared. Our own datasets
  are prepared on first use, so they always count as available."""
  if bad_files not in class_folder.BAD_FILES:  # a folder's policy, refused on any dataset alike
    raise ValueError(f"data.bad_files={bad_files!r} is not one of {class_folder.BAD_FILES}")
  builder = get_builder(name, data_dir, bad_files)
  if not isinstance(builder, local_builder.LocalBuilder):
    ensure_prepared(builder)


def _not_prepared_error(builder: tfds.core.DatasetBuilder) -> str:
  data_dir = os.fspath(builder.data_dir_root)
  name = builder.name
  if builder.builder_config is not None:
    name += f"/{builder.builder_config.name}"
  return (
    f"TFDS dataset {builder.info.full_name!r} is not prepared in "
    f"{data_dir}. Prepare it once in array_record format, where TensorFlow "
    f"is installed: `tfds build {name} --data_dir={data_dir} "
    "--file_format=array_record` (an existing "
    "TFRecord copy can be converted with `tfds convert_format`); or use "
    "name='embedded' / 'folder:<path>'."
  )


def open_split(builder: tfds.core.DatasetBuilder, split: str, image_key: str = "image"):
  """Random-access source of `split` whose `image_key` holds encoded bytes."""
  features = builder.info.features
  if image_key not in features:
    raise KeyError(
      f"Dataset {builder.info.full_name!r} has no feature {image_key!r}; "
      f"its features are {sorted(features)}: set config.image_key."
    )
  decoders = None
  if isinstance(features[image_key], tfds.features.Image):
    # Keep the encoded bytes: PIL decodes them in the pipeline's workers.
    decoders = {image_key: tfds.decode.SkipDecoding()}
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except (KeyError, ValueError) as e:
    raise ValueError(
      f"Dataset {builder.info.full_name!r} has no split {split!r} "
      f"({e}); its splits are {sorted(builder.info.splits)}."
    ) from None


def class_names(
  builder: tfds.core.DatasetBuilder, label_key: str = "label"
) -> tuple[str, ...] | None:
  """Class names of `label_key` if it is a ClassLabel, else None."""
  feature = builder.info.features[label_key]
  if isinstance(feature, tfds.features.ClassLabel):
    return tuple(feature.names)
  return None


def to_8bit(image: Image.Image) -> Image.Image:
  """Integer images of more than 8 bits and float images as 8-bit 'L'.

  PIL's own `convert('RGB')` clips 16-bit ('I;16', 'I') and float ('F')
  pixels to 255, so a 16-bit PNG becomes all white. 16-bit and 32-bit
  integer pixels are taken as 16-bit data (0..65535, as PNG and TIFF store
  them) and scaled by 255/65535; float pixels as 0..1 (TIFF's convention for
  float images), scaled by 255. Both rounded and clipped."""
  if image.mode.startswith("I;16") or image.mode == "I":
    array = np.asarray(image, np.float64) * (255.0 / 65535.0)
  elif image.mode == "F":
    array = np.asarray(image, np.float64) * 255.0
  else:
    return image
  return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def decode_image(value) -> Image.Image:
  """An image feature (encoded bytes or uint8 array) as an RGB PIL image."""
  if isinstance(value, (bytes, bytearray)):
    image = Image.open(io.BytesIO(value))
  else:
    array = np.asarray(value)
    image = Image.fromarray(array[..., 0] if array.shape[-1:] == (1,) else array)
  # Grayscale, CMYK, palette and 16-bit images exist in ImageNet and user folders.
  return to_8bit(image).convert("RGB")
