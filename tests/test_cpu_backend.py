"""The C++ ``cpu`` backend against the float64 golden, by the parity rule of DESIGN.md.

The extension must be built (the README's setup builds it); set
RAINFUSION_SKIP_CPP=1 only on a machine deliberately installed without it.
"""
import os

import pytest
import torch

import rainfusion_core as rf
from conftest import random_dense
from rainfusion_core import registry
from rainfusion_core.backends import cpu as cpu_module
from rainfusion_core.parity import parity

if os.environ.get("RAINFUSION_SKIP_CPP") == "1":
    pytest.skip("RAINFUSION_SKIP_CPP=1: installed without the C++ extension", allow_module_level=True)

CASES = [  # (q_len, kv_len, q_heads, kv_heads, head_dim)
    pytest.param(129, 129, 2, 2, 64, id="129-partial-block"),
    pytest.param(777, 777, 4, 2, 32, id="777-gqa2-d32"),
    pytest.param(1000, 1000, 4, 1, 128, id="1000-gqa4-d128"),
    pytest.param(1023, 1023, 2, 2, 64, id="1023"),
    pytest.param(113, 203, 2, 1, 64, id="113x203-cross"),
    pytest.param(1, 300, 2, 2, 16, id="single-query"),
    pytest.param(300, 300, 2, 2, 40, id="d40-not-a-vector-multiple"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _run(q_len, kv_len, q_heads, kv_heads, dim, dtype, *, bsnd=False, block_size=128):
    shape_q, shape_kv = (2, q_heads, q_len, dim), (2, kv_heads, kv_len, dim)
    if bsnd:  # [B, S, H, D] storage seen as strided [B, H, S, D] views
        q = torch.randn(2, q_len, q_heads, dim, dtype=torch.float64).transpose(1, 2)
        k, v = (torch.randn(2, kv_len, kv_heads, dim, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(shape_q, dtype=torch.float64)
        k, v = torch.randn(shape_kv, dtype=torch.float64), torch.randn(shape_kv, dtype=torch.float64)
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    dense = random_dense(2, q_heads, nq, nk, density=0.4, empty_rows=[(1, q_heads - 1, nq - 1)])
    mask = rf.BlockMask.from_dense(dense, block_size=block_size, q_len=q_len, kv_len=kv_len)
    golden = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    low = [x.to(dtype) for x in (q, k, v)]
    ref_lp = rf.block_sparse_attention(*low, mask, backend="torch")
    out = rf.block_sparse_attention(*low, mask, backend=rf.get_backend(name="cpu"))
    return out, golden, ref_lp, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len, kv_len, q_heads, kv_heads, dim", CASES)
def test_parity_with_float64_golden(q_len, kv_len, q_heads, kv_heads, dim, dtype):
    out, golden, ref_lp, mask = _run(q_len, kv_len, q_heads, kv_heads, dim, dtype)
    assert out.dtype == dtype and out.shape == golden.shape
    result = parity(out, golden, ref_lp)
    assert result.passed, str(result)
    last = (mask.shape[2] - 1) * mask.block_size
    assert out[1, q_heads - 1, last:].abs().max() == 0  # empty row -> zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bsnd_strided_views(dtype):
    out, golden, ref_lp, _ = _run(1000, 1000, 4, 2, 64, dtype, bsnd=True)
    assert parity(out, golden, ref_lp).passed


@pytest.mark.parametrize("block_size", [64, 100, 256])
def test_other_block_sizes(block_size):
    out, golden, ref_lp, _ = _run(777, 777, 2, 1, 64, torch.float32, block_size=block_size)
    assert parity(out, golden, ref_lp).passed


def test_float64_is_exact_to_rounding():
    out, golden, _, _ = _run(1023, 1023, 2, 1, 64, torch.float64)
    assert (out - golden).abs().max() < 1e-12


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
    registry._warned.clear()
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=64, q_len=64, kv_len=64)
    with pytest.warns(RuntimeWarning, match=r"'cpu' skipped on cpu \(the C\+\+ extension is not built \(test\)\); using 'torch'"):
        rf.block_sparse_attention(q, k, v, mask)
    with pytest.raises(rf.BackendUnavailableError, match="'cpu' is unavailable: the C\\+\\+ extension is not built"):
        rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend(name="cpu"))
    rows = {r.name: r for r in rf.list_backends()}
    assert not rows["cpu"].available and "not built" in rows["cpu"].reason
    registry._warned.clear()


def test_kernel_reports_openmp():
    kernel, reason = cpu_module._load_kernel()
    assert reason is None
    assert isinstance(kernel.has_openmp(), bool)
