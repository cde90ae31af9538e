import pytest
import torch

import rainfusion_core as rf
from helpers import naive_attention, random_dense
from rainfusion_core.backends.torch_backend import masked_attention
from rainfusion_core.parity import parity

SHAPES = [  # (q_len, kv_len, q_heads, kv_heads, head_dim, block_size)
    pytest.param(113, 203, 2, 2, 32, 64, id="ragged-113x203"),
    pytest.param(1023, 1024, 2, 1, 64, 128, id="1023x1024-gqa2"),
    pytest.param(129, 129, 4, 1, 16, 128, id="129-gqa4-partial"),
    pytest.param(1, 1, 2, 2, 8, 128, id="single-token"),
    pytest.param(300, 300, 4, 2, 128, 32, id="d128-gqa2"),
]


def _inputs(q_len, kv_len, q_heads, kv_heads, dim, dtype=torch.float64, batch=2):
    q = torch.randn(batch, q_heads, q_len, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("q_len, kv_len, q_heads, kv_heads, dim, bs", SHAPES)
def test_float64_matches_naive(q_len, kv_len, q_heads, kv_heads, dim, bs):
    q, k, v = _inputs(q_len, kv_len, q_heads, kv_heads, dim)
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    dense = random_dense(2, q_heads, nq, nk, empty_rows=[(0, q_heads - 1, nq - 1)])
    mask = rf.BlockMask.from_dense(dense, block_size=bs, q_len=q_len, kv_len=kv_len)
    out = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(out, naive_attention(q, k, v, dense, bs, dim ** -0.5), rtol=1e-10, atol=1e-12)
    assert out[0, q_heads - 1, (nq - 1) * bs :].abs().max() == 0  # empty row -> zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_parity_of_golden(dtype):
    q, k, v = _inputs(203, 203, 4, 2, 64)
    dense = random_dense(2, 4, 4, 4)
    mask = rf.BlockMask.from_dense(dense, block_size=64, q_len=203, kv_len=203)
    golden = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    out = rf.block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, backend="torch")
    assert out.dtype == dtype
    # The torch backend *is* the low-precision reference; its error must sit near the dtype's epsilon.
    assert (out.double() - golden).abs().max() < {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]


def test_chunking_does_not_change_the_result():
    q, k, v = _inputs(700, 500, 2, 1, 32)
    dense = random_dense(2, 2, 11, 8, empty_rows=[(1, 1, 10)])
    mask = rf.BlockMask.from_dense(dense, block_size=64, q_len=700, kv_len=500)
    whole = masked_attention(q, k, v, mask, 0.3)
    chunked = masked_attention(q, k, v, mask, 0.3, chunk_elements=1)  # one block of rows per chunk
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-14)


def test_bsnd_strided_views():
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(257, 257, 4, 2, 32))
    assert not q.is_contiguous()
    dense = random_dense(2, 4, 3, 3)
    mask = rf.BlockMask.from_dense(dense, block_size=128, q_len=257, kv_len=257)
    out = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(out, naive_attention(q, k, v, dense, 128, 32 ** -0.5), rtol=1e-10, atol=1e-12)


def test_full_mask_equals_sdpa():
    q, k, v = _inputs(300, 300, 4, 4, 32)
    mask = rf.BlockMask.from_dense(torch.ones(2, 4, 3, 3, dtype=torch.bool), block_size=128, q_len=300, kv_len=300)
    out = rf.block_sparse_attention(q, k, v, mask, scale=0.2)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.2))


def test_parity_rule_judges_errors():
    golden = torch.randn(4, 64, dtype=torch.float64)
    ref_lp = (golden + 1e-3 * torch.randn_like(golden)).half()
    assert parity(ref_lp, golden, ref_lp).passed
    assert not parity((golden * 1.05).half(), golden, ref_lp).passed
    nan = ref_lp.clone()
    nan[0, 0] = float("nan")
    assert not parity(nan, golden, ref_lp).passed
