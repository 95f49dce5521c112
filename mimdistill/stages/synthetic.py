"""A stage's task with a random batch instead of its data: what the
benchmark and the scale tests run (`<stage>.synthetic(config)`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mimdistill.models.variants import EncoderSpec
from mimdistill.training.loop import Task


@dataclasses.dataclass
class Synthetic:
  stage: str
  task: Task
  batch: dict[str, np.ndarray]  # one global batch (host numpy)
  info: dict[str, Any]  # image_size, speed options, a model description
  notes: list[str]


def random_images(batch: int, spec: EncoderSpec, rng: np.random.Generator) -> np.ndarray:
  """uint8 pixels, as the input pipeline sends them (normalised in the step)."""
  return rng.integers(0, 256, (batch, spec.image_size, spec.image_size, spec.in_chans), np.uint8)
