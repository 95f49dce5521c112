"""Data: TFDS datasets read with grain (no TensorFlow), PIL augmentations.

Modules: `input_pipeline` (the entry point `make_dataset`, device placement
`to_global`), `transforms` (torchvision-semantics augmentations), `sources`
(dataset names -> prepared TFDS data sources), `embedded_shapes` and
`class_folder` (mimdistill's own TFDS builders), `local_builder` (their
TensorFlow-free preparation).
"""

from mimdistill.data.input_pipeline import BatchIterator, Pipeline, make_dataset, to_global

__all__ = ["BatchIterator", "Pipeline", "make_dataset", "to_global"]
