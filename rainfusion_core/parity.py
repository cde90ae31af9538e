"""The numerical parity rule of docs/design.md, shared by tests and the conformance kit."""
from __future__ import annotations

from dataclasses import dataclass

import torch

#: absolute error floors per test dtype
FLOORS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
FACTOR = 2.0


@dataclass(frozen=True)
class ParityResult:
    """Errors of one output against the float64 golden, and the limits they must stay under."""

    max_error: float
    mean_error: float
    max_limit: float
    mean_limit: float
    has_nan: bool

    @property
    def passed(self) -> bool:
        return not self.has_nan and self.max_error <= self.max_limit and self.mean_error <= self.mean_limit

    def __str__(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return (
            f"{verdict}: max|err| {self.max_error:.3e} (limit {self.max_limit:.3e}), "
            f"mean|err| {self.mean_error:.3e} (limit {self.mean_limit:.3e}), nan={self.has_nan}"
        )


def parity(out: torch.Tensor, golden: torch.Tensor, ref_lp: torch.Tensor) -> ParityResult:
    """Judge ``out`` against ``golden`` (float64) with the low-precision reference ``ref_lp``.

    Passes when ``max|out - golden| <= max(2 * max|ref_lp - golden|, floor)``
    and likewise for the mean absolute error, with the floor of ``out.dtype``;
    any NaN fails.
    """
    if out.shape != golden.shape or ref_lp.shape != golden.shape:
        raise ValueError(
            f"shapes differ: out {tuple(out.shape)}, golden {tuple(golden.shape)}, ref_lp {tuple(ref_lp.shape)}"
        )
    floor = FLOORS[out.dtype]
    golden = golden.detach().to("cpu", torch.float64)
    err = (out.detach().to("cpu", torch.float64) - golden).abs()
    ref_err = (ref_lp.detach().to("cpu", torch.float64) - golden).abs()
    return ParityResult(
        max_error=float(err.max()),
        mean_error=float(err.mean()),
        max_limit=max(FACTOR * float(ref_err.max()), floor),
        mean_limit=max(FACTOR * float(ref_err.mean()), floor),
        has_nan=bool(torch.isnan(out).any()),
    )


#: absolute error floor of a log-sum-exp (float32, of magnitude log(S) plus the largest scaled score)
LSE_FLOOR = 1e-4


def lse_parity(lse: torch.Tensor, golden: torch.Tensor, ref_lp: torch.Tensor) -> str | None:
    """``None`` when ``lse`` passes the parity rule against ``golden`` (float64) with the low-precision
    reference ``ref_lp``, else why not: rows with no kept key are ``-inf`` exactly where the golden's
    are, and on the others ``max|lse - golden| <= max(2 * max|ref_lp - golden|, LSE_FLOOR)``."""
    lse, golden, ref_lp = (x.detach().to("cpu", torch.float64) for x in (lse, golden, ref_lp))
    if lse.shape != golden.shape:
        return f"lse has shape {tuple(lse.shape)}, expected {tuple(golden.shape)}"
    empty = golden == float("-inf")
    if not torch.equal(lse == float("-inf"), empty):
        return "lse is -inf on other rows than those with no kept key"
    rows = ~empty
    if bool(torch.isnan(lse[rows]).any()):
        return "NaN in lse"
    if not bool(rows.any()):
        return None
    error = float((lse[rows] - golden[rows]).abs().max())
    limit = max(FACTOR * float((ref_lp[rows] - golden[rows]).abs().max()), LSE_FLOOR)
    return None if error <= limit else f"lse max error {error:.2e} vs limit {limit:.2e}"
