"""Conformance kit: prove a backend numerically equal to the float64 golden.

    from rainfusion_core.testing import check_backend, assert_backend_conforms
    report = check_backend("my_asic", device="mlu:0")
    print(report)            # one row per case: case, dtype, max error, limit, verdict
    assert report.passed

Every case draws fresh random inputs (never zeros), runs the backend, and
judges the output with the parity rule of docs/design.md (``rainfusion_core.parity``)
against the ``torch`` backend in float64 on the CPU, with the ``torch`` backend
in the test dtype on the backend's device as the low-precision reference.
With ``precision="fp8"`` the low-precision reference is
:func:`~rainfusion_core.fp8.fp8_reference_attention`, which rounds q, k, v and
P as the FP8 recipe does: an FP8 backend's error against the float64 golden must
stay within twice the reference's. A backend that declares ``returns_lse`` is run
with ``return_lse=True`` and its log-sum-exp judged the same way
(:func:`~rainfusion_core.parity.lse_parity`: ``-inf`` exactly on the rows with no
kept key).
The device memory the backend will allocate is poisoned with NaN first
(best effort: a NaN fill is freed just before the call, so caching allocators
hand it back), to catch rows the backend never writes. A case the backend
refuses through ``unsupported_reasons`` is reported as ``refused``, not failed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .backend import Backend
from .block_mask import BlockMask
from .errors import UnsupportedInputError
from .parity import lse_parity, parity
from .precision import DEFAULT_PRECISION, get_precision
from .progress import progress
from .registry import get_backend, select_backend

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_HEAD_DIMS = (32, 64, 128)


@dataclass(frozen=True)
class Case:
    """One input configuration of the kit."""

    name: str
    q_len: int
    kv_len: int
    q_heads: int = 2
    kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 128
    pattern: str = "random"  # random | full | one_per_row | empty_rows
    bsnd: bool = False
    batch: int = 1


def kit_head_dims(backend: Backend) -> tuple[int, ...]:
    """The head dims the kit tests on ``backend``: the ones it lists, or those of 32, 64 and 128 it computes."""
    declared = backend.head_dims
    if isinstance(declared, tuple):
        return declared
    return tuple(d for d in DEFAULT_HEAD_DIMS if declared is None or d in declared)


def default_cases(head_dims: tuple[int, ...] = DEFAULT_HEAD_DIMS, *, long: bool = True) -> list[Case]:
    """The kit's named case list: ragged lengths, head dims, GQA, mask patterns, strides."""
    cases = [Case(f"len-{n}", n, n) for n in (1, 113, 127, 129, 1000, 1023)]
    cases.append(Case("cross-113x203", 113, 203))
    if long:
        cases += [Case("long-4097", 4097, 4097, q_heads=1, kv_heads=1), Case("long-4096-gqa2", 4096, 4096, 2, 1)]
    cases += [Case(f"head-dim-{d}", 300, 300, head_dim=d) for d in head_dims]
    cases += [
        Case("gqa-2to1", 257, 257, q_heads=4, kv_heads=2),
        Case("gqa-4to1", 257, 257, q_heads=4, kv_heads=1),
        Case("empty-rows", 640, 640, pattern="empty_rows"),
        Case("full-mask", 500, 500, pattern="full"),
        Case("nearly-empty-mask", 777, 777, pattern="one_per_row"),
        Case("bsnd-strides", 300, 300, q_heads=4, kv_heads=2, bsnd=True),
        Case("block-64", 300, 300, block_size=64),
        Case("batch-2", 200, 200, batch=2),
    ]
    return cases


@dataclass(frozen=True)
class CaseResult:
    case: str
    dtype: str
    max_error: float
    limit: float
    verdict: str  # "pass", "FAIL" or "refused"
    detail: str = ""


@dataclass
class ConformanceReport:
    """Results of :func:`check_backend`; ``passed`` when no case failed and at least one ran."""

    backend: str
    device: str
    rows: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        verdicts = [r.verdict for r in self.rows]
        return "FAIL" not in verdicts and "pass" in verdicts

    def table(self) -> str:
        lines = [f"{'case':<22} {'dtype':<9} {'max error':>10} {'limit':>10}  verdict"]
        for r in self.rows:
            err = "-" if math.isnan(r.max_error) else f"{r.max_error:.2e}"
            lim = "-" if math.isnan(r.limit) else f"{r.limit:.2e}"
            lines.append(f"{r.case:<22} {r.dtype:<9} {err:>10} {lim:>10}  {r.verdict}"
                         + (f"  ({r.detail})" if r.detail else ""))
        counts = {v: sum(r.verdict == v for r in self.rows) for v in ("pass", "FAIL", "refused")}
        lines.append(f"backend {self.backend!r} on {self.device}: {counts['pass']} passed, "
                     f"{counts['FAIL']} failed, {counts['refused']} refused -> {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)

    __str__ = table


def _mask(case: Case, gen: torch.Generator) -> torch.Tensor:
    nq, nk = -(-case.q_len // case.block_size), -(-case.kv_len // case.block_size)
    shape = (case.batch, case.q_heads, nq, nk)
    if case.pattern == "full":
        return torch.ones(shape, dtype=torch.bool)
    if case.pattern == "one_per_row":
        pick = torch.randint(0, nk, shape[:3] + (1,), generator=gen)
        return torch.zeros(shape, dtype=torch.bool).scatter_(-1, pick, True)
    dense = torch.rand(shape, generator=gen) < 0.35
    if case.pattern == "empty_rows":
        dense[..., ::2, :] = False  # every other query block keeps nothing
    return dense


def _inputs(case: Case, gen: torch.Generator):
    def draw(heads, length):
        if case.bsnd:  # [B, S, H, D] storage seen as [B, H, S, D]
            return torch.randn(case.batch, length, heads, case.head_dim, generator=gen, dtype=torch.float64).transpose(1, 2)
        return torch.randn(case.batch, heads, length, case.head_dim, generator=gen, dtype=torch.float64)

    return draw(case.q_heads, case.q_len), draw(case.kv_heads, case.kv_len), draw(case.kv_heads, case.kv_len)


def _poison(shape, dtype, device) -> None:
    if torch.device(device).type != "cpu":
        poison = torch.full(shape, float("nan"), dtype=dtype, device=device)
        del poison


def run_case(backend: Backend, case: Case, dtype: torch.dtype, device, *, seed: int = 0,
             precision: str = DEFAULT_PRECISION) -> CaseResult:
    recipe = get_precision(precision)
    extra = recipe.backend_keywords()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(case, gen)
    dense = _mask(case, gen)
    mask = BlockMask.from_dense(dense, block_size=case.block_size, q_len=case.q_len, kv_len=case.kv_len)
    scale = case.head_dim ** -0.5
    low = [x.to(device, dtype) for x in (q, k, v)]  # keeps strides: a BSND view stays one
    mask_dev = mask.to(device)
    name = str(dtype).replace("torch.", "")
    try:
        select_backend(backend, *low, mask_dev, precision)
    except UnsupportedInputError as exc:
        return CaseResult(case.name, name, math.nan, math.nan, "refused", str(exc).split(": ", 1)[-1])
    torch_backend = get_backend("torch")
    # with the log-sum-exp where the backend returns it (in the default precision): judged like the output
    lse_wanted = backend.returns_lse and recipe.is_default
    golden, golden_lse = torch_backend.forward(q, k, v, mask, scale, return_lse=True)
    if recipe.reference is not None:  # the precision's roundings, from the same low-precision inputs, on the CPU
        ref_lp = recipe.reference(*(x.cpu() for x in low), mask, scale)
    else:
        ref_lp, ref_lse = torch_backend.forward(*low, mask_dev, scale, return_lse=True)
    _poison(ref_lp.shape, dtype, device)
    try:
        out = backend.forward(*low, mask_dev, scale, **extra, **({"return_lse": True} if lse_wanted else {}))
    except Exception as exc:  # a crash is a failure of this case, reported in the table
        return CaseResult(case.name, name, math.nan, math.nan, "FAIL", f"{type(exc).__name__}: {exc}"[:120])
    lse = None
    if lse_wanted:
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor)):
            return CaseResult(case.name, name, math.nan, math.nan, "FAIL",
                              f"forward(return_lse=True) returned {type(out).__name__}, not (out, lse)")
        out, lse = out
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(golden.shape) or out.dtype != dtype:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        return CaseResult(case.name, name, math.nan, math.nan, "FAIL", f"expected {dtype} {tuple(golden.shape)}, got {got}")
    result = parity(out, golden, ref_lp)
    detail = "" if result.passed else ("NaN in output" if result.has_nan else
                                       f"mean error {result.mean_error:.2e} vs limit {result.mean_limit:.2e}")
    lse_problem = None if lse is None else lse_parity(lse, golden_lse, ref_lse)
    if lse_problem is not None:
        detail = "; ".join(filter(None, [detail, lse_problem]))
    passed = result.passed and lse_problem is None
    return CaseResult(case.name, name, result.max_error, result.max_limit, "pass" if passed else "FAIL", detail)


def check_backend(
    backend_or_name: Backend | str,
    *,
    device: str | torch.device | None = None,
    dtypes=None,
    cases: list[Case] | None = None,
    seed: int = 0,
    precision: str = DEFAULT_PRECISION,
) -> ConformanceReport:
    """Run the conformance cases on a backend and return the report.

    Args:
        backend_or_name: a ``Backend`` or a registered backend name.
        device: where to run; default the backend's first device type (``"cpu"`` for ``"*"``).
        dtypes: dtypes to try; default all four float dtypes (refusals are reported).
        cases: default :func:`default_cases` with :func:`kit_head_dims` of the backend.
        precision: ``"bf16"`` (the inputs' precision) or ``"fp8"`` (judged against the FP8
            reference; cases the backend refuses in FP8 are reported as refused).
    """
    backend = backend_or_name if isinstance(backend_or_name, Backend) else get_backend(name=backend_or_name)
    if device is None:
        first = backend.device_types[0]
        device = "cpu" if first == "*" else first
    device = torch.device(device)
    cases = cases if cases is not None else default_cases(kit_head_dims(backend))
    report = ConformanceReport(backend.name, str(device))
    dtypes = list(dtypes or DTYPES)
    with progress(total=len(cases) * len(dtypes), desc=f"parity {backend.name}", unit="case") as bar:
        for i, case in enumerate(cases):
            for dtype in dtypes:
                bar.set_postfix_str(f"{case.name} {str(dtype).replace('torch.', '')}")
                report.rows.append(run_case(backend, case, dtype, device, seed=seed + i, precision=precision))
                bar.update()
    return report


def assert_backend_conforms(backend_or_name: Backend | str, **kwargs) -> ConformanceReport:
    """:func:`check_backend`, raising ``AssertionError`` with the table when it fails."""
    report = check_backend(backend_or_name, **kwargs)
    if not report.passed:
        raise AssertionError("conformance failed\n" + report.table())
    return report
