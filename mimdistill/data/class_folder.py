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
its resolved path, so two roots never share a prepared copy. The prepared
copy records a fingerprint of the folder (every image's relative path, size
and modification time); each run compares it with the folder and either
reuses the copy (equal) or prepares it again (changed: files added, removed
or modified), saying which.

At preparation every image is decoded once (in threads): a corrupt or
non-image file is named, and the run refuses the folder (`bad_files='refuse'`,
the default) or leaves those files out (`'skip'`), instead of crashing at
some step of training, again at every resume.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil

import tensorflow_datasets as tfds
from PIL import Image

from mimdistill.data import local_builder

# The project's logger, so the quiet console keeps these lines (absl's are library lines).
log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


BAD_FILES = ("refuse", "skip")
FINGERPRINT = "mimdistill_fingerprint.json"


@dataclasses.dataclass(eq=False)
class ClassFolderConfig(tfds.core.BuilderConfig):
  root: str = ""
  bad_files: str = "refuse"


def config_for(root: str | os.PathLike, bad_files: str = "refuse") -> ClassFolderConfig:
  """The builder config of folder `root` (its name is unique per folder and
  `bad_files` policy: skipping files makes another dataset)."""
  if bad_files not in BAD_FILES:
    raise ValueError(f"data.bad_files={bad_files!r} is not one of {BAD_FILES}")
  resolved = os.path.realpath(os.fspath(root))
  digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
  # TFDS config names become directory names: keep them to [A-Za-z0-9_.-].
  base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(resolved)) or "root"
  return ClassFolderConfig(
    name=f"{base}-{digest}" + ("-skipbad" if bad_files == "skip" else ""),
    root=resolved,
    bad_files=bad_files,
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


def image_files(root: str, splits, classes) -> list[str]:
  """Paths relative to `root` of every image, in the order examples are made."""
  files = []
  for split in splits:
    for name in classes:
      class_dir = os.path.join(root, split, name)
      if os.path.isdir(class_dir):
        files += [f"{split}/{name}/{f}" for f in sorted(os.listdir(class_dir)) if _is_image(f)]
  return files


def fingerprint(root: str, files: list[str]) -> dict[str, list[int]]:
  """`relative path -> [size, mtime_ns]` of every image."""
  out = {}
  for rel in files:
    st = os.stat(os.path.join(root, rel))
    out[rel] = [st.st_size, st.st_mtime_ns]
  return out


def describe_change(old: dict, new: dict) -> str:
  added = sorted(set(new) - set(old))
  removed = sorted(set(old) - set(new))
  changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
  parts = [
    f"{len(v)} {what}" + (f" (e.g. {v[0]})" if v else "")
    for what, v in (("added", added), ("removed", removed), ("modified", changed))
    if v
  ]
  return ", ".join(parts) or "no image changed"


def undecodable(root: str, files: list[str], threads: int = 8) -> list[tuple[str, str]]:
  """`(relative path, why)` of every file PIL cannot fully decode."""

  def check(rel):
    try:
      with Image.open(os.path.join(root, rel)) as image:
        image.load()
      return None
    except Exception as e:  # PIL raises many types for broken files
      return rel, f"{type(e).__name__}: {e}"

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return [bad for bad in pool.map(check, files) if bad]


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
    self._files = image_files(config.root, self._splits, self._classes)
    self._skip: set[str] = set()
    super().__init__(config=config, **kwargs)

  def _fingerprint_path(self):
    return os.path.join(os.fspath(self.data_dir), FINGERPRINT)

  def is_current(self) -> bool:
    """Prepared from the folder as it is now (else it is re-prepared; a copy
    without a fingerprint, from an older mimdistill, counts as changed)."""
    if not self.is_prepared():
      return False
    path = self._fingerprint_path()
    if not os.path.isfile(path):
      log.warning("%s: prepared copy has no fingerprint; re-preparing", self.info.full_name)
      return False
    with open(path) as f:
      old = json.load(f)["files"]
    new = fingerprint(self.builder_config.root, self._files)
    if old == new:
      log.info("folder %s unchanged: reusing its prepared copy", self.builder_config.root)
      return True
    log.warning(
      "folder %s changed since it was prepared (%s): preparing it again",
      self.builder_config.root,
      describe_change(old, new),
    )
    return False

  def discard(self) -> None:
    """Deletes the prepared copy of this version."""
    shutil.rmtree(os.fspath(self.data_dir), ignore_errors=True)

  def prepare(self) -> None:
    if self.is_prepared():
      return
    root = self.builder_config.root
    bad = undecodable(root, self._files)
    if bad:
      shown = "; ".join(f"{rel} ({why[:80]})" for rel, why in bad[:8])
      more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
      if self.builder_config.bad_files == "refuse":
        raise ValueError(
          f"folder {root}: {len(bad)} file(s) do not decode as images: {shown}{more}; fix or "
          "remove them, or set --config.data.bad_files=skip to leave them out"
        )
      log.warning(
        "folder %s: leaving out %d undecodable file(s): %s%s", root, len(bad), shown, more
      )
      self._skip = {rel for rel, _ in bad}
    super().prepare()
    with open(self._fingerprint_path(), "w") as f:
      json.dump({"files": fingerprint(root, self._files)}, f)

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
        if key in self._skip:
          continue
        with open(os.path.join(class_dir, filename), "rb") as f:
          image = f.read()
        yield key, {"image": image, "label": label, "id": key}
