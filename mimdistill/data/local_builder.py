"""Base of mimdistill's own TFDS builders: prepared locally, without TensorFlow.

Writing a TFDS dataset needs no TensorFlow as long as (checked in
tensorflow-datasets 4.9):
  * images are handed to `tfds.features.Image` as encoded bytes (a numpy array
    would be encoded with a TensorFlow graph),
  * the file format is `array_record` (TFRecord writing goes through
    `tf.io`), and
  * nothing is downloaded: GCS lookups are off (`try_download_gcs=False`) and
    the builder has no checksums file (TFDS's default lookup of that file
    needs the `importlib_resources` package, which TFDS does not declare).
"""

import logging

import tensorflow_datasets as tfds

# The project's logger, so the quiet console keeps these lines (absl's are library lines).
log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder whose examples come from local code or files."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks for a download-checksums file next to the builder's code;
    # these builders download nothing.
    return None

  def prepare(self) -> None:
    """Writes the dataset into its data dir once; later calls are no-ops."""
    if self.is_prepared():
      return
    log.info("Preparing %s into %s (once).", self.info.full_name, self.data_dir)
    try:
      self.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
    except (OSError, ValueError):
      # Several processes (hosts on a shared disk, test workers) may prepare
      # the same dataset at once; TFDS writes into a temporary dir and renames
      # it, so the loser of the race fails on the rename yet finds the data.
      if not self.is_prepared():
        raise
