"""Collects parity comparisons and prints one line per quantity."""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

import numpy as np

# DESIGN.md tolerances (float32, highest matmul precision).
ACT_TOL = 1e-5
GRAD_REL_TOL = 1e-4


@dataclasses.dataclass
class Line:
  case: str
  quantity: str
  err: float
  tol: float
  ok: bool

  def __str__(self) -> str:
    return (
      f"{self.case} {self.quantity} {self.err:.3e} {self.tol:.0e} {'ok' if self.ok else 'FAIL'}"
    )


class Report:
  def __init__(self, stream: TextIO | None = None):
    self.lines: list[Line] = []
    self._stream = stream

  @property
  def stream(self) -> TextIO:
    # Resolved per call so redirected stdout (pytest capture) is honoured.
    return self._stream or sys.stdout

  def _add(self, line: Line):
    self.lines.append(line)
    print(line, file=self.stream, flush=True)

  def _max_abs(self, case, quantity, got, expected) -> float:
    """Max absolute error; a shape mismatch is reported and counts as inf."""
    if got.shape != expected.shape:
      print(
        f"# {case} {quantity}: shape {got.shape} != expected {expected.shape}", file=self.stream
      )
      return float("inf")
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)), initial=0.0))

  def compare(self, case: str, quantity: str, got, expected, tol: float = ACT_TOL):
    """Max absolute error against `tol`."""
    err = self._max_abs(case, quantity, np.asarray(got), np.asarray(expected))
    self._add(Line(case, quantity, err, tol, bool(err <= tol)))

  def compare_relative(self, case: str, quantity: str, got, expected, tol: float = GRAD_REL_TOL):
    """Max absolute error divided by the expected tensor's max magnitude."""
    got, expected = np.asarray(got), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = self._max_abs(case, quantity, got, expected) / scale
    self._add(Line(case, quantity, err, tol, bool(err <= tol)))

  def check(self, case: str, quantity: str, ok: bool, detail: str = ""):
    """A yes/no check, printed with err 0 (pass) or 1 (fail)."""
    if detail:
      print(f"# {case} {quantity}: {detail}", file=self.stream)
    self._add(Line(case, quantity, 0.0 if ok else 1.0, 0.0, bool(ok)))

  @property
  def failed(self) -> int:
    return sum(not l.ok for l in self.lines)

  @property
  def passed(self) -> int:
    return sum(l.ok for l in self.lines)
