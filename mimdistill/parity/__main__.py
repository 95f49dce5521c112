"""`python -m mimdistill.parity [DIR ...]`: check against official outputs.

Without DIR: the fixtures copied into the repository (`tests/fixtures`),
plus the cases of `../shared/fixtures` of kinds the copy lacks, when a
developer checkout has it. DIR is a fixture folder in the format of
`shared/fixtures/` (config.json with a `kind`, inputs.npz, expected.npz,
official .pth files), or a folder of such folders. Each kind is one module
`mimdistill/parity/kinds/<kind>.py` exposing `check(folder, config, report)`. Prints `case quantity max_abs_err tol ok|FAIL` per quantity and a
final `parity: N passed, M failed`; exits 1 if anything failed.
"""

from __future__ import annotations

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


REPO = pathlib.Path(__file__).resolve().parents[2]
COPIED = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared" / "fixtures"


def _cases(folder: pathlib.Path) -> list[pathlib.Path]:
  """A case folder, or every case in a folder of cases."""
  if (folder / "config.json").is_file():
    return [folder]
  return sorted(p.parent for p in folder.glob("*/config.json")) or [folder]


def default_cases() -> list[pathlib.Path]:
  """The repository's copied fixtures, then the shared cases of other kinds."""
  cases = _cases(COPIED) if COPIED.is_dir() else []
  kinds = {json.loads((c / "config.json").read_text()).get("kind") for c in cases}
  if SHARED.is_dir():
    cases += [
      c
      for c in _cases(SHARED)
      if json.loads((c / "config.json").read_text()).get("kind") not in kinds
    ]
  return cases


def main(argv: list[str] | None = None) -> int:
  """`argv`: the arguments after the program name (default: sys.argv's)."""
  from absl import flags

  from mimdistill.launch_flags import parse_command_line

  argv = ["python -m mimdistill.parity", *(sys.argv[1:] if argv is None else argv)]
  folders = parse_command_line(flags.FlagValues(), argv, __doc__, positional=None)
  if folders is None:
    return 0 if any(a in ("-h", "--help") for a in argv) else 2
  cases = [c for f in folders for c in _cases(pathlib.Path(f))] if folders else default_cases()
  if not cases:
    print(f"parity: no fixtures found (looked in {COPIED} and {SHARED})", file=sys.stderr)
    return 2

  import jax

  # Parity is judged at float32 with exact matmuls (TPU/GPU default to bf16
  # passes otherwise).
  jax.config.update("jax_default_matmul_precision", "highest")

  report = Report()
  for case in cases:
    run_folder(case, report)
  print(f"parity: {report.passed} passed, {report.failed} failed")
  return 1 if report.failed or not report.lines else 0


if __name__ == "__main__":
  sys.exit(main())
