"""Executes launch/colab/quickstart.ipynb headless (nbclient) at tiny size: its
parameters cell is replaced by a few steps and tiny widths, the official
checkpoint it loads is a tiny official-format .pth written here. Checks that
no cell errored, that the figures are shown (image/png outputs) and that the
workdir holds what the stages write."""

import base64
import io
import os
import time

import jax
import numpy as np
import pytest
from conftest import ONE_DEVICE_XLA_FLAGS, REPO

NOTEBOOK = REPO / "launch" / "colab" / "quickstart.ipynb"

try:
  import ipykernel  # noqa: F401  (the python3 kernel nbclient starts)
  import nbclient
  import nbformat
except ImportError as e:
  pytestmark = pytest.mark.skip(
    reason=f"executing the notebook needs nbclient, nbformat and ipykernel ({e}); "
    "pip install -e '.[test]'"
  )

TINY_PARAMETERS = """
WORKDIR = {workdir!r}
REPO_URL = ""
DATASET = "embedded"
DATA_DIR = {data_dir!r}
USE_TFDS = False
TFDS_NAME = "cifar10"
PRETRAIN_STEPS = 3
DISTILL_STEPS = 3
FINETUNE_STEPS = 3
BATCH_SIZE = 16
EVAL_BATCH_SIZE = 200
TEACHER = dict(width=32, depth=2, num_heads=2, patch_size=4)
DECODER = dict(width=32, depth=1, num_heads=2)
STUDENT = dict(width=32, depth=1, num_heads=2, patch_size=4)
RELATION_HEADS = 0
NUM_DEVICES = 1
DTYPE = "float32"
OFFICIAL_CHECKPOINT = {official!r}
OFFICIAL_NUM_HEADS = 2
"""

# Cell tag -> how many figures (image/png outputs) it must show.
FIGURES = {
  "reconstructions": 1,
  "relation-maps": 1,
  "relation-maps-custom": 1,
  "finetune": 2,
  "curves": 1,
  "curves-inline": 1,
}


def official_teacher_pth(path):
  """A tiny MAE-pretrain-format .pth (official names, encoder only)."""
  from pth_writer import write_state_dict

  from mimdistill.interop.official_names import flax_to_official
  from mimdistill.models.vit import ViTEncoder

  enc = ViTEncoder(width=32, depth=2, num_heads=2, patch_size=4, image_size=32)
  variables = jax.device_get(enc.init(jax.random.PRNGKey(3), np.zeros((1, 32, 32, 3))))
  tensors = {
    k: np.ascontiguousarray(v, np.float32) for k, v in flax_to_official(variables, "vit").items()
  }
  write_state_dict(path, tensors, extra={"epoch": 799})
  return path


def images_of(cell):
  out = []
  for o in cell.get("outputs", []):
    data = o.get("data", {})
    if "image/png" in data:
      out.append(base64.b64decode(data["image/png"]))
  return out


def test_quickstart_notebook_runs_headless(tfds_dir, tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and params[0] is next(c for c in nb.cells if c.cell_type == "code")
  workdir = tmp_path / "run"
  official = official_teacher_pth(tmp_path / "mae_pretrain_tiny.pth")
  params[0].source = TINY_PARAMETERS.format(
    workdir=str(workdir), data_dir=str(tfds_dir), official=str(official)
  )
  # The kernel is a fresh process: one CPU device, the repo importable
  # without installing anything (the install cell must then do nothing).
  monkeypatch.setenv("XLA_FLAGS", ONE_DEVICE_XLA_FLAGS)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(
    "PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
  )
  client = nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  t0 = time.time()
  try:
    client.execute()
  finally:
    nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look after a failure
  print(f"notebook executed in {time.time() - t0:.0f} s")

  code = [c for c in nb.cells if c.cell_type == "code"]
  errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
  assert all(c.execution_count for c in code), "a cell did not run"
  install = "\n".join(o.get("text", "") for o in code[1].get("outputs", []))
  assert "mimdistill from" in install and "pip" not in install

  from PIL import Image

  by_tag = {t: c for c in code for t in c.metadata.get("tags", [])}
  for tag, count in FIGURES.items():
    pngs = images_of(by_tag[tag])
    assert len(pngs) == count, (tag, len(pngs))
    for png in pngs:
      with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and min(img.size) > 150, (tag, img.size)

  text = "".join(o.get("text", "") for o in by_tag["official-checkpoint"]["outputs"])
  assert "detected: layout=vit width=32 depth=2 heads=2" in text, text
  assert "teacher ready: block 2 of 2" in text, text

  for rel in (
    "summary.json",
    "pretrain/reconstructions.png",
    "distill/relation_maps.png",
    "relation_maps_custom.png",
    "finetune/learning_curves.png",
    "finetune/confusion_matrix.png",
    "learning_curves_all.png",
    "pretrain/metrics.jsonl",
    "distill/metrics.jsonl",
    "finetune/metrics.jsonl",
    "finetune/stage_done.json",
  ):
    path = workdir / rel
    assert path.is_file() and path.stat().st_size > 0, rel
