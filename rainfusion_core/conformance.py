"""The conformance kit as a pytest suite, for a backend vendor's own CI.

    RAINFUSION_BACKEND=my_asic RAINFUSION_DEVICE=mlu:0 python -m pytest --pyargs rainfusion_core.conformance

Optional: ``RAINFUSION_DTYPES=float16,bfloat16`` to limit dtypes. One test per
(case, dtype); a refused case is skipped with the backend's reason.
"""
from __future__ import annotations

import os

import pytest
import torch

from rainfusion_core.registry import get_backend
from rainfusion_core.testing import DEFAULT_HEAD_DIMS, DTYPES, default_cases, run_case

_NAME = os.environ.get("RAINFUSION_BACKEND")
if not _NAME:
    raise pytest.UsageError("set RAINFUSION_BACKEND to the name of the backend to check (and RAINFUSION_DEVICE)")
_BACKEND = get_backend(name=_NAME)
_DEVICE = os.environ.get("RAINFUSION_DEVICE") or (
    "cpu" if _BACKEND.device_types[0] == "*" else _BACKEND.device_types[0]
)
_DTYPES = (
    [getattr(torch, d.strip()) for d in os.environ["RAINFUSION_DTYPES"].split(",")]
    if os.environ.get("RAINFUSION_DTYPES") else list(DTYPES)
)
_CASES = default_cases(tuple(_BACKEND.head_dims or DEFAULT_HEAD_DIMS))


@pytest.mark.parametrize("dtype", _DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", _CASES, ids=lambda c: c.name)
def test_conformance(case, dtype):
    result = run_case(_BACKEND, case, dtype, _DEVICE, seed=_CASES.index(case))
    if result.verdict == "refused":
        pytest.skip(f"refused by {_NAME}: {result.detail}")
    assert result.verdict == "pass", (
        f"{_NAME} on {_DEVICE}, {case.name} {result.dtype}: max error {result.max_error:.3e} "
        f"> limit {result.limit:.3e} {result.detail}"
    )
