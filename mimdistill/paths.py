"""Workdir and checkpoint paths that may be local or in a bucket.

Every path the stages write under (workdirs, checkpoints, figures, metrics)
goes through `as_path`, an `etils.epath.Path`, so a `gs://bucket/run` workdir
on a Cloud TPU pod works like a local folder. `pathlib` would silently turn
`gs://b/x` into the local folder `./gs:/b/x`.
"""

from __future__ import annotations

import os

from etils import epath

BUCKET_SCHEMES = ("gs://",)
# epath reads these too, but Orbax, tensorboardX and our tests have only been
# wired for Cloud Storage: refuse them rather than half-work.
_UNSUPPORTED_SCHEMES = ("s3://", "az://", "hf://")
INSTALL_HINT = "pip install 'mimdistill[gcs]' (gcsfs and google-cloud-storage)"


def is_remote(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(BUCKET_SCHEMES)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path; local paths made absolute (Orbax requires it)."""
  text = os.fspath(path)
  if not text:
    raise ValueError("empty path; give a folder such as workdirs/run or gs://bucket/run")
  if text.startswith(_UNSUPPORTED_SCHEMES):
    raise ValueError(
      f"{text}: only local paths and gs:// buckets are supported; use a gs:// or local workdir"
    )
  if is_remote(text):
    _check_bucket_backend(text)
    return epath.Path(text)
  return epath.Path(text).expanduser().absolute()


def check_workdir(path: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
  """`as_path(path)` for a folder a run will write into, refused up front
  when a local one cannot be: it is a file, or sits under one (the lock file
  would fail with a bare errno after the config was loaded)."""
  if not os.fspath(path):
    raise ValueError(f"{flag} is empty; give a folder such as workdirs/run or gs://bucket/run")
  folder = as_path(path)
  if is_remote(os.fspath(path)):
    return folder
  if folder.exists() and not folder.is_dir():
    raise ValueError(f"{flag}={path} is a file, not a folder; pass a folder (new or existing)")
  parent = folder.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"{flag}={path} is under the file {parent}; pass a folder path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}={path}: {parent} is not writable; pass a folder you can write to")
  return folder


def _check_bucket_backend(text: str) -> None:
  import fsspec

  try:
    fsspec.get_filesystem_class("gcs")  # what epath asks for behind gs://
  except (ImportError, ValueError):
    raise ImportError(f"{text} is in Cloud Storage, which needs gcsfs: {INSTALL_HINT}") from None
