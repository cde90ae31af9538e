"""The conformance kit as a pytest suite, for a backend vendor's own CI.

    RAINFUSION_BACKEND=my_asic RAINFUSION_DEVICE=mlu:0 python -m pytest --pyargs rainfusion_core.conformance

Optional: ``RAINFUSION_DTYPES=float16,bfloat16`` to limit dtypes;
``RAINFUSION_PRECISION=fp8`` to check the backend's FP8 path against the FP8 reference.
One test per (case, dtype); a refused case is skipped with the backend's reason.
"""
from __future__ import annotations

import os

import pytest

from rainfusion_core.errors import BackendError
from rainfusion_core.precision import DEFAULT_PRECISION, PRECISIONS
from rainfusion_core.registry import get_backend
from rainfusion_core.testing import DTYPES, default_cases, kit_head_dims, run_case


class _ConfigError(Exception):
    pass


def _configure():
    """``(name, backend, device, dtypes, cases, precision)`` from the environment; ``_ConfigError`` says what
    is wrong."""
    name = os.environ.get("RAINFUSION_BACKEND")
    if not name:
        raise _ConfigError("set RAINFUSION_BACKEND to the name of the backend to check (and RAINFUSION_DEVICE)")
    try:
        backend = get_backend(name=name)
    except BackendError as exc:
        raise _ConfigError(f"RAINFUSION_BACKEND={name}: {exc}") from None
    device = os.environ.get("RAINFUSION_DEVICE") or (
        "cpu" if backend.device_types[0] == "*" else backend.device_types[0]
    )
    dtypes = list(DTYPES)
    if os.environ.get("RAINFUSION_DTYPES"):
        names = [d.strip() for d in os.environ["RAINFUSION_DTYPES"].split(",")]
        known = {str(d).replace("torch.", ""): d for d in DTYPES}
        unknown = [d for d in names if d not in known]
        if unknown:
            raise _ConfigError(f"RAINFUSION_DTYPES: unknown dtype(s) {unknown}; expected some of {sorted(known)}")
        dtypes = [known[d] for d in names]
    precision = os.environ.get("RAINFUSION_PRECISION") or DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise _ConfigError(f"RAINFUSION_PRECISION: unknown precision {precision!r}; expected one of {PRECISIONS}")
    return name, backend, device, dtypes, default_cases(kit_head_dims(backend)), precision


try:
    _NAME, _BACKEND, _DEVICE, _DTYPES, _CASES, _PRECISION = _configure()
    _PROBLEM = None
except _ConfigError as exc:  # nothing can be checked: one failing test says why, without a traceback
    _NAME, _BACKEND, _DEVICE, _DTYPES, _CASES, _PRECISION = None, None, None, [], [], DEFAULT_PRECISION
    _PROBLEM = str(exc)


@pytest.mark.skipif(_PROBLEM is None, reason="the backend to check is configured")
def test_configuration():
    pytest.fail(f"rainfusion_core.conformance: {_PROBLEM}", pytrace=False)


@pytest.mark.parametrize("dtype", _DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.name)
def test_conformance(case, dtype):
    result = run_case(_BACKEND, case, dtype, _DEVICE, seed=_CASES.index(case), precision=_PRECISION)
    if result.verdict == "refused":
        pytest.skip(f"refused by {_NAME}: {result.detail}")
    assert result.verdict == "pass", (
        f"{_NAME} on {_DEVICE}, {case.name} {result.dtype}: max error {result.max_error:.3e} "
        f"> limit {result.limit:.3e} {result.detail}"
    )
