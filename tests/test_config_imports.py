"""Config files import only ml_collections and configs.common: loading one
(e.g. for `--help` or a notebook's parameters) pulls in no training stack."""

import subprocess
import sys

from conftest import REPO

HEAVY = ("orbax", "grain", "optax", "jax", "flax", "tensorflow_datasets")


def test_configs_import_no_training_modules():
  code = (
    "import sys; sys.path.insert(0, sys.argv[1]);"
    "import configs.finetune, configs.pipeline, configs.segment, configs.cae, "
    "configs.hetero_distill, configs.spark_pretrain, configs.tinymim_distill, configs.mae_pretrain;"
    "configs.pipeline.get_config('quickstart');"
    f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout
