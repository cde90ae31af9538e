"""Every backend against the float64 golden by the parity rule, on one named case list.

The rule (docs/design.md): ``max|out - golden| <= max(2 x max|ref_lp - golden|, floor)``
and the same for the mean error, ``ref_lp`` being the ``torch`` backend in the
test dtype; no NaN. A case a backend refuses (``unsupported_reasons``) is skipped
with its reason. Backends: ``cpu`` (the C++ kernel), ``triton`` (on a GPU, or in
Triton's CPU interpreter), ``npu`` (against the strict double of its operator)
and the example plugin.
"""
import importlib.util

import pytest
import torch

import rainfusion_core as rf
from helpers import install_npu_double, triton_device
from rainfusion_core.testing import Case, run_case

CASES = [  # name, q_len, kv_len, q heads, kv heads, head dim
    Case("ragged-113x203", 113, 203, 2, 2, 64, pattern="empty_rows"),
    Case("ragged-129-partial-block", 129, 129, 2, 2, 64, pattern="empty_rows"),
    Case("1023x1024-gqa2", 1023, 1024, 2, 1, 64, pattern="empty_rows"),
    Case("1000-gqa4-d128", 1000, 1000, 4, 1, 128, pattern="empty_rows"),
    Case("777-gqa2-d32", 777, 777, 4, 2, 32, pattern="empty_rows"),
    Case("single-query-d16", 1, 77, 2, 2, 16),
    Case("d40-not-a-vector-multiple", 300, 300, 2, 2, 40),
    Case("d48-block64", 200, 200, 2, 2, 48, block_size=64, pattern="empty_rows"),
    Case("d256", 150, 150, 2, 1, 256),
    Case("bsnd-strides", 300, 300, 4, 2, 64, bsnd=True),
    Case("full-mask", 257, 257, 2, 2, 64, pattern="full"),
    Case("one-block-per-row", 777, 777, 2, 2, 128, pattern="one_per_row"),
    Case("block-100", 777, 777, 2, 1, 64, block_size=100),
    Case("block-256", 777, 777, 2, 1, 64, block_size=256),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(params=["cpu", "triton", "npu", "example_blockwise"])
def target(request, monkeypatch):
    """``(backend, device)`` of one backend, or a skip saying why it cannot run here."""
    name = request.param
    if name == "triton":
        device = triton_device(module_level=False)
        return rf.get_backend(name="triton"), device
    if name == "npu":
        install_npu_double(monkeypatch)
    if name == "example_blockwise" and importlib.util.find_spec("rainfusion_example_plugin") is None:
        pytest.skip("the example plugin is not installed: pip install -e examples/rainfusion-example-plugin")
    row = {r.name: r for r in rf.list_backends()}[name]
    if not row.available:
        pytest.skip(f"backend {name!r} is unavailable here: {row.reason}")
    return rf.get_backend(name=name), "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity_with_the_float64_golden(target, case, dtype):
    backend, device = target
    if backend.name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bf16 tl.dot wrongly (triton 3.9); bf16 is checked on the GPU")
    result = run_case(backend, case, dtype, device, seed=CASES.index(case))
    if result.verdict == "refused":
        pytest.skip(f"refused by {backend.name}: {result.detail}")
    assert result.verdict == "pass", result
