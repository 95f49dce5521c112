"""Class names of the segmentation datasets, for the per-class IoU table
and the pictures: ADE20K's 150 (mmseg `ADE20KDataset.CLASSES`, in label
order after `reduce_zero_label`), the embedded scenes' 11, else
`class_<i>`."""

from __future__ import annotations

from mimdistill.data import embedded_segmentation

ADE20K = (
  "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
  "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
  "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
  "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
  "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
  "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
  "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
  "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
  "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
  "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
  "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
  "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
  "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
  "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
  "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
  "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
  "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
  "clock", "flag",
)  # fmt: skip


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
  """Names for `num_classes` classes of dataset `dataset` (a data.name)."""
  if dataset == "embedded_segmentation" and num_classes == embedded_segmentation.NUM_CLASSES:
    return embedded_segmentation.CLASS_NAMES
  if num_classes == len(ADE20K) and (
    dataset.startswith("ade20k:") or dataset.startswith("scene_parse150")
  ):
    return ADE20K
  return tuple(f"class_{i}" for i in range(num_classes))
