"""NaN and infinite inputs: every backend propagates them exactly where dense attention does
(float64 dense attention on the CPU: a score of +inf makes its row NaN, one of -inf weighs nothing).

A NaN or infinite value in q or k makes the pooled scores of its rows non-finite; those rows
keep every block, so no backend drops the poisoned keys and returns plausible values (or zeros)
where dense attention returns NaN.
"""
import pytest
import torch
import torch.nn.functional as F

import rainfusion_core as rf
from helpers import needs_cpp, triton_device

LAYOUT = rf.VideoLayout(4, 8, 16)  # 512 tokens, 8 blocks of 64; the first frame (2 blocks) is the sink
POISON = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def _device(backend):
    return triton_device(module_level=False) if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpp), "triton"])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("value", list(POISON))
@pytest.mark.parametrize("token", [300, 500], ids=["mid", "last-block"])  # outside the sink blocks
def test_poisoned_inputs_give_nan_exactly_where_dense_attention_does(backend, where, value, token):
    device = _device(backend)
    q, k, v = (torch.randn(1, 2, LAYOUT.seq_len, 32, device=device) for _ in range(3))
    (q if where == "q" else k)[0, 1, token, 5] = POISON[value]
    # float64 on the CPU: CUDA's fused SDPA kernels turn a row with one -inf score into NaN
    dense = F.scaled_dot_product_attention(*(x.double().cpu() for x in (q, k, v))).to(device)
    out = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.9, block_size=64, backend=backend, min_tokens=0)
    dense_nan, out_nan = dense.isnan().any(-1), out.isnan().any(-1)
    assert dense_nan.any()  # the case is a real one: dense attention is poisoned somewhere
    assert torch.equal(out_nan, dense_nan), (int(dense_nan.sum()), int(out_nan.sum()))
    assert not (out[~out_nan] == 0).all(-1).any()  # no row of plausible zeros


def test_the_predicted_mask_keeps_every_block_of_a_poisoned_row():
    q, k = torch.randn(1, 2, LAYOUT.seq_len, 32), torch.randn(1, 2, LAYOUT.seq_len, 32)
    q[0, 0, 300, 0] = float("nan")  # query block 4 of head 0
    mask = rf.predict_block_mask(q, k, LAYOUT, sparsity=0.9, block_size=64)
    assert mask.dense[0, 0, 4].all() and int(mask.kv_counts[0, 0, 4]) == 8
    assert not mask.dense[0, 0, 5].all() and not mask.dense[0, 1, 4].all()  # other rows stay sparse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_poisoned_row_stays_alone_in_16_bits_with_an_odd_key_count(dtype):
    """PyTorch's CPU matmul in bfloat16 spills a NaN row into its neighbour at some key counts (100 here):
    the torch backend multiplies P V on float32 operands, so only the poisoned row is NaN."""
    q, k, v = (torch.randn(1, 1, 100, 32).to(dtype) for _ in range(3))
    q[0, 0, 5, 0] = float("nan")
    mask = rf.BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=128, q_len=100, kv_len=100)
    out = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    assert out.isnan().any(-1).nonzero()[:, 2].tolist() == [5]
