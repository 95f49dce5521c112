"""`mimdistill_seg_folder`: a TFDS builder over image / annotation folders.

Recognised layouts under `root` (one split per sub-folder; files pair up
by name without extension):

    root/images/<split>/*.jpg|.jpeg|.png  +  root/annotations/<split>/*.png
        (ADE20K's ADEChallengeData2016: splits `training`, `validation`;
        mmseg's img_dir / ann_dir datasets)
    root/images/<split>/*                 +  root/masks/<split>/*.png
    root/ADEChallengeData2016/...         (the folder that holds it)

or any explicit pairs of folders per split (`config_for_pairs`). Prepared
once into the TFDS data dir in `array_record` format, without TensorFlow:
the encoded bytes are stored as read. Features: `image`, `annotation` (the
class-index PNG; ADE20K's raw values, 0 = 'other': apply
`reduce_zero_label` when loading, as mmseg does), `id` (the file's path
relative to the split's image folder). The same keys as TFDS's
`scene_parse150`, so one transform serves both.

Every image must have an annotation and vice versa: the error names the
unpaired files. Like `class_folder`, the prepared copy is not re-validated
against the folder: delete `<data_dir>/mimdistill_seg_folder/<config>` to
re-prepare after changing files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import tensorflow_datasets as tfds

from mimdistill.data import local_builder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_EXTENSIONS = (".png",)
MASK_DIRS = ("annotations", "masks")
EXPECTED_LAYOUT = (
  "expected root/images/<split>/*.jpg with root/annotations/<split>/*.png (ADE20K's "
  "ADEChallengeData2016: images/training, annotations/training, images/validation, "
  "annotations/validation), or root/images/<split>/ with root/masks/<split>/*.png; images "
  "and masks pair up by file name without extension"
)


@dataclasses.dataclass(eq=False)
class SegFolderConfig(tfds.core.BuilderConfig):
  # JSON of {split: [image_dir, mask_dir]} (a string keeps the config hashable).
  pairs: str = ""


def _config(pairs: dict[str, tuple[str, str]], base: str) -> SegFolderConfig:
  resolved = {s: [os.path.realpath(i), os.path.realpath(m)] for s, (i, m) in sorted(pairs.items())}
  text = json.dumps(resolved, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:12]
  base = re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "root"
  return SegFolderConfig(
    name=f"{base}-{digest}",
    pairs=text,
    version=SegFolderBuilder.VERSION,
    description=f"Image / annotation folders {resolved}.",
  )


def has_layout(root: str | os.PathLike) -> bool:
  """Whether `root` looks like a segmentation layout (an `images/` folder, or
  an `ADEChallengeData2016/` one) rather than class folders; `find_layout`
  then checks it."""
  root = os.fspath(root)
  return os.path.isdir(os.path.join(root, "images")) or os.path.isdir(
    os.path.join(root, "ADEChallengeData2016")
  )


def find_layout(root: str | os.PathLike) -> dict[str, tuple[str, str]]:
  """`{split: (image_dir, mask_dir)}` of a recognised layout under `root`."""
  root = os.path.realpath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"segmentation dataset root {root!r} is not a directory; " + EXPECTED_LAYOUT
    )
  nested = os.path.join(root, "ADEChallengeData2016")
  if not os.path.isdir(os.path.join(root, "images")) and os.path.isdir(nested):
    root = nested
  images = os.path.join(root, "images")
  if os.path.isdir(images):
    for mask_name in MASK_DIRS:
      masks = os.path.join(root, mask_name)
      if not os.path.isdir(masks):
        continue
      splits = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
      pairs = {s: (os.path.join(images, s), os.path.join(masks, s)) for s in splits}
      missing = [s for s, (_, m) in pairs.items() if not os.path.isdir(m)]
      if missing:
        raise ValueError(
          f"{root}: split folder(s) {missing} of images/ have no {mask_name}/<split> folder; "
          + EXPECTED_LAYOUT
        )
      if pairs:
        return pairs
  found = sorted(os.listdir(root))[:10]
  raise ValueError(
    f"{root} is not a recognised segmentation dataset layout (it holds {found}); " + EXPECTED_LAYOUT
  )


def _files(folder: str, extensions) -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in extensions and os.path.isfile(os.path.join(folder, name)):
      if stem in out:
        raise ValueError(f"{folder} has two files named {stem!r}: {out[stem]} and {name}")
      out[stem] = name
  return out


def pair_files(image_dir: str, mask_dir: str) -> list[tuple[str, str]]:
  """`[(image file, mask file)]` paired by stem; unpaired files are an error
  that names them."""
  for folder in (image_dir, mask_dir):
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{folder} is not a directory; " + EXPECTED_LAYOUT)
  images = _files(image_dir, IMAGE_EXTENSIONS)
  masks = _files(mask_dir, MASK_EXTENSIONS)
  lone_images = sorted(images[s] for s in set(images) - set(masks))
  lone_masks = sorted(masks[s] for s in set(masks) - set(images))
  if lone_images or lone_masks:
    parts = []
    if lone_images:
      parts.append(f"images without an annotation in {mask_dir}: {lone_images[:10]}")
    if lone_masks:
      parts.append(f"annotations without an image in {image_dir}: {lone_masks[:10]}")
    more = len(lone_images) + len(lone_masks) - len(lone_images[:10]) - len(lone_masks[:10])
    raise ValueError(
      "image and annotation files do not pair up; "
      + "; ".join(parts)
      + (f" (and {more} more)" if more > 0 else "")
    )
  if not images:
    raise ValueError(f"{image_dir} holds no images ({IMAGE_EXTENSIONS}); " + EXPECTED_LAYOUT)
  return [(images[s], masks[s]) for s in sorted(images)]


def config_for(root: str | os.PathLike) -> SegFolderConfig:
  """The builder config of a folder in a recognised layout."""
  pairs = find_layout(root)
  return _config(pairs, os.path.basename(os.path.realpath(os.fspath(root))))


def config_for_pairs(pairs: dict[str, tuple[str, str]], name: str = "pairs") -> SegFolderConfig:
  """The builder config of explicit `{split: (image_dir, mask_dir)}`."""
  return _config(dict(pairs), name)


class SegFolderBuilder(local_builder.LocalBuilder):
  """TFDS builder of one image / annotation folder set (pass
  `config=config_for(root)` or `config_for_pairs(...)`)."""

  name = "mimdistill_seg_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = []

  def __init__(self, *, config: SegFolderConfig, **kwargs):
    if not isinstance(config, SegFolderConfig) or not config.pairs:
      raise ValueError(f"{self.name} needs config=segmentation_folders.config_for(root)")
    self._pairs = {s: tuple(p) for s, p in json.loads(config.pairs).items()}
    # Pairing is checked before anything is written.
    self._files = {s: pair_files(*p) for s, p in self._pairs.items()}
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.builder_config.description,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "annotation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "id": tfds.features.Text(),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._pairs}

  def _generate_examples(self, split):
    image_dir, mask_dir = self._pairs[split]
    for image_name, mask_name in self._files[split]:
      with open(os.path.join(image_dir, image_name), "rb") as f:
        image = f.read()
      with open(os.path.join(mask_dir, mask_name), "rb") as f:
        mask = f.read()
      yield f"{split}/{image_name}", {"image": image, "annotation": mask, "id": image_name}
