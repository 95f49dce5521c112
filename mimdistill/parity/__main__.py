"""`python -m mimdistill.parity DIR [DIR ...]`: check against official outputs.

DIR is a fixture folder in the format of `shared/fixtures/` (config.json with
a `kind`, inputs.npz, expected.npz, official .pth files). Each kind is one
module `mimdistill/parity/kinds/<kind>.py` exposing `check(folder, config,
report)`. Prints `case quantity max_abs_err tol ok|FAIL` per quantity and a
final `parity: N passed, M failed`; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import pkgutil
import sys

from mimdistill.parity.report import Report


def available_kinds() -> list[str]:
  from mimdistill.parity import kinds

  return sorted(m.name for m in pkgutil.iter_modules(kinds.__path__))


def run_folder(folder: pathlib.Path, report: Report) -> None:
  config_path = folder / "config.json"
  if not config_path.is_file():
    raise SystemExit(
      f"parity: {folder} has no config.json; point at a fixture "
      "folder (e.g. ../shared/fixtures/mae)"
    )
  config = json.loads(config_path.read_text())
  kind = config.get("kind")
  if kind not in available_kinds():
    raise SystemExit(
      f"parity: {config_path} has kind {kind!r}, which this "
      f"version does not check; known kinds: {available_kinds()}"
    )
  module = importlib.import_module(f"mimdistill.parity.kinds.{kind}")
  module.check(folder, config, report)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m mimdistill.parity", description=__doc__.splitlines()[0]
  )
  parser.add_argument("folders", nargs="+", type=pathlib.Path)
  args = parser.parse_args(argv)

  import jax

  # Parity is judged at float32 with exact matmuls (TPU/GPU default to bf16
  # passes otherwise).
  jax.config.update("jax_default_matmul_precision", "highest")

  report = Report()
  for folder in args.folders:
    # A folder of fixture folders (e.g. shared/fixtures) checks every case.
    cases = (
      [folder]
      if (folder / "config.json").is_file()
      else sorted(p.parent for p in folder.glob("*/config.json")) or [folder]
    )
    for case in cases:
      run_folder(case, report)
  print(f"parity: {report.passed} passed, {report.failed} failed")
  return 1 if report.failed or not report.lines else 0


if __name__ == "__main__":
  sys.exit(main())
