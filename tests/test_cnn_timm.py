"""timm's ResNet-50 and ConvNeXt-T: a timm state dict converts and gives
timm's logits (<= 1e-4), and the export loads into timm with strict=True.

torch and timm never enter this process (the project does not depend on
them): the torch side runs in a subprocess of an interpreter that has both,
this one if it does, else `$MIMDISTILL_TORCH_PYTHON`; without one the test
is skipped. The timm models get random weights with every BatchNorm
statistic, scale and layer-scale gamma perturbed, so that each tensor
matters, and a classifier scaled to logits of std 3."""

import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimdistill.interop.cnn_checkpoint import export_cnn, import_cnn
from mimdistill.models.cnn_zoo import build_cnn

TORCH_SIDE = r"""
import sys, numpy as np, torch, timm
mode, name, folder = sys.argv[1:4]
torch.manual_seed(0)
model = timm.create_model(name, pretrained=False, num_classes=10).eval()
if mode == "make":
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for key, t in model.state_dict().items():
      if key.endswith(("running_mean", "bias")):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
      elif key.endswith(("running_var", "gamma")) or (key.endswith("weight") and t.ndim == 1):
        t.copy_(torch.rand(t.shape, generator=g) + 0.5)
  images = torch.randn(2, 3, 64, 64, generator=g)
  with torch.no_grad():  # a classifier of realistic logits (std 3): the error is absolute
    head = model.get_classifier()
    scale = 3.0 / model(images).std()
    head.weight.mul_(scale)
    head.bias.mul_(scale)
  torch.save(model.state_dict(), f"{folder}/{name}.pth")
  np.savez(f"{folder}/{name}_io.npz", images=images.numpy(), logits=model(images).detach().numpy())
else:
  state = {k: torch.from_numpy(v) for k, v in np.load(f"{folder}/{name}_export.npz").items()}
  model.load_state_dict(state, strict=True)
  images = torch.from_numpy(np.load(f"{folder}/{name}_io.npz")["images"])
  np.save(f"{folder}/{name}_reloaded.npy", model(images).detach().numpy())
print("ok")
"""


def torch_python() -> str | None:
  if importlib.util.find_spec("torch") and importlib.util.find_spec("timm"):
    return sys.executable
  other = os.environ.get("MIMDISTILL_TORCH_PYTHON")
  return other if other and shutil.which(other) else None


@pytest.mark.parametrize("name, family", [("resnet50", "resnet"), ("convnext_tiny", "convnext")])
def test_timm_state_dict_converts_and_exports(name, family, tmp_path):
  python = torch_python()
  if python is None:
    pytest.skip("needs torch and timm (here, or an interpreter in $MIMDISTILL_TORCH_PYTHON)")
  script = tmp_path / "torch_side.py"
  script.write_text(TORCH_SIDE)
  torch_side = lambda mode: subprocess.run(
    [python, str(script), mode, name, str(tmp_path)], capture_output=True, text=True, timeout=600
  )
  made = torch_side("make")
  assert made.returncode == 0, made.stderr[-3000:]
  io = np.load(tmp_path / f"{name}_io.npz")

  imported = import_cnn(tmp_path / f"{name}.pth")
  assert imported.fields["family"] == family and imported.fields["num_classes"] == 10
  assert all(n.endswith("num_batches_tracked") for n in imported.report.skipped)
  model = build_cnn(imported.fields)
  images = jnp.asarray(io["images"].transpose(0, 2, 3, 1))
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(lambda v, x: model.apply(v, x).logits)(imported.variables, images)
  err = float(np.max(np.abs(np.asarray(logits) - io["logits"])))
  print(f"{name}: max |logits - timm| = {err:.2e} (max |logit| {np.abs(io['logits']).max():.2f})")
  assert err <= 1e-4

  names = "timm" if family == "convnext" else "official"
  exported = export_cnn(jax.device_get(imported.variables), family, convnext_names=names)
  np.savez(tmp_path / f"{name}_export.npz", **exported)
  reloaded = torch_side("reload")
  assert reloaded.returncode == 0, reloaded.stderr[-3000:]  # strict=True accepted it
  np.testing.assert_allclose(np.load(tmp_path / f"{name}_reloaded.npy"), io["logits"], atol=1e-6)
