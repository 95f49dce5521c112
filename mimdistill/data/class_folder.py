"""`mimdistill_class_folder`: a TFDS builder over a class-folder tree.

Layout (the one many users keep ImageNet in, and `../shared/data/cifar10`):

    root/<split>/<class>/<image>.jpg|.jpeg|.png

Each folder is prepared once into the TFDS data dir in `array_record` format,
so training reads it with random access through the same `tfds.data_source` +
grain path as any TFDS dataset. The encoded image bytes are stored as they are
(no decode/re-encode: faster, lossless, and needs no TensorFlow); `label` is
the class index with classes sorted by folder name (torchvision `ImageFolder`
order, taken over the union of all splits so every split agrees); `id` is the
file's path relative to `root`.

Every root gets its own builder config, named after the folder and a hash of
its resolved path, so two roots never share a prepared copy. The copy is not
re-validated against the folder: after changing the folder's files, delete
`<data_dir>/mimdistill_class_folder/<config name>` to re-prepare.
"""

import dataclasses
import hashlib
import os
import re

import tensorflow_datasets as tfds

from mimdistill.data import local_builder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(eq=False)
class ClassFolderConfig(tfds.core.BuilderConfig):
  root: str = ""


def config_for(root: str | os.PathLike) -> ClassFolderConfig:
  """The builder config of folder `root` (its name is unique per folder)."""
  resolved = os.path.realpath(os.fspath(root))
  digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
  # TFDS config names become directory names: keep them to [A-Za-z0-9_.-].
  base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(resolved)) or "root"
  return ClassFolderConfig(
    name=f"{base}-{digest}",
    root=resolved,
    version=ClassFolderBuilder.VERSION,
    description=f"Class folders under {resolved}.",
  )


def _is_image(filename: str) -> bool:
  return filename.lower().endswith(IMAGE_EXTENSIONS)


def scan(root: str) -> tuple[list[str], list[str]]:
  """Returns (splits, classes) of `root`; raises with the fix if malformed."""
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"Class-folder dataset root {root!r} is not a directory; pass "
      f"'folder:<path>' with <path>/<split>/<class>/*.jpg."
    )
  splits, classes = [], set()
  for split in sorted(os.listdir(root)):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      continue
    split_classes = [c for c in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, c))]
    if split_classes:
      splits.append(split)
      classes.update(split_classes)
  if not splits:
    raise ValueError(
      f"Class-folder dataset root {root!r} has no <split>/<class>/ "
      f"sub-folders; expected {root}/train/<class>/*.jpg (and e.g. test/)."
    )
  return splits, sorted(classes)


class ClassFolderBuilder(local_builder.LocalBuilder):
  """TFDS builder of one class-folder tree (pass `config=config_for(root)`)."""

  name = "mimdistill_class_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # No predefined configs: every root makes its own with `config_for(root)`.
  BUILDER_CONFIGS = []

  def __init__(self, *, config: ClassFolderConfig, **kwargs):
    if not isinstance(config, ClassFolderConfig) or not config.root:
      raise ValueError(f"{self.name} needs config=class_folder.config_for(root); got {config!r}.")
    self._splits, self._classes = scan(config.root)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly (not `dataset_info_from_configs`), which
    # would look for metadata files next to this module.
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.builder_config.description,
      features=tfds.features.FeaturesDict(
        {
          # Bytes are stored as read from disk (JPEG or PNG alike); the
          # declared encoding only matters to TFDS's own decoder, and PIL
          # sniffs the real format when mimdistill decodes.
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(names=self._classes),
          "id": tfds.features.Text(),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files: nothing to download.
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split):
    root = self.builder_config.root
    for label, name in enumerate(self._classes):
      class_dir = os.path.join(root, split, name)
      if not os.path.isdir(class_dir):
        continue  # A class may be absent from one split (e.g. a tiny val).
      for filename in sorted(os.listdir(class_dir)):
        if not _is_image(filename):
          continue
        key = f"{split}/{name}/{filename}"
        with open(os.path.join(class_dir, filename), "rb") as f:
          image = f.read()
        yield key, {"image": image, "label": label, "id": key}
