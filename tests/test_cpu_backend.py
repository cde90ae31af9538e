"""The C++ ``cpu`` backend: exactness in float64, agreement with SDPA, selection (parity: test_parity.py).

The extension must be built (the README's setup builds it); set
RAINFUSION_SKIP_CPP=1 only on a machine deliberately installed without it.
"""
import os

import pytest
import torch

import rainfusion_core as rf
from rainfusion_core.backends import cpu as cpu_module
from rainfusion_core.testing import Case, run_case

if os.environ.get("RAINFUSION_SKIP_CPP") == "1":
    pytest.skip("RAINFUSION_SKIP_CPP=1: installed without the C++ extension", allow_module_level=True)

def test_float64_is_exact_to_rounding():
    result = run_case(rf.get_backend(name="cpu"), Case("1023-gqa2", 1023, 1023, 2, 1, 64), torch.float64, "cpu")
    assert result.max_error < 1e-12


def test_full_mask_matches_sdpa():
    q, k, v = (torch.randn(1, 4, 1000, 64) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 4, 8, 8, dtype=torch.bool), block_size=128, q_len=1000, kv_len=1000)
    out = rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend(name="cpu"))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-4)


def test_sparse_attention_uses_the_cpu_backend_by_default():
    assert rf.get_backend("cpu").name == "cpu"
    layout = rf.VideoLayout(3, 10, 12)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, dtype=torch.float64) for _ in range(3))
    fast = rf.sparse_attention(q, k, v, layout, sparsity=0.6, block_size=32)
    ref = rf.sparse_attention(q, k, v, layout, sparsity=0.6, block_size=32, backend="torch")
    assert (fast - ref).abs().max() < 1e-12


def test_missing_extension_falls_back_with_warning_and_explicit_use_fails(monkeypatch):
    monkeypatch.setattr(cpu_module, "_load_kernel", lambda: (None, "the C++ extension is not built (test)"))
    with rf.scoped_backends():  # its own once-only warnings
        _check_missing_extension()


def _check_missing_extension():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=64, q_len=64, kv_len=64)
    with pytest.warns(RuntimeWarning, match=r"'cpu' skipped on cpu \(the C\+\+ extension is not built \(test\)\); using 'torch'"):
        rf.block_sparse_attention(q, k, v, mask)
    with pytest.raises(rf.BackendUnavailableError, match="'cpu' is unavailable: the C\\+\\+ extension is not built"):
        rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend(name="cpu"))
    rows = {r.name: r for r in rf.list_backends()}
    assert not rows["cpu"].available and "not built" in rows["cpu"].reason


def test_kernel_reports_openmp():
    kernel, reason = cpu_module._load_kernel()
    assert reason is None
    assert isinstance(kernel.has_openmp(), bool)
