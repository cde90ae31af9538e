"""The ``triton`` backend: its refusals, launch planning, and GPU-only properties.

On a machine without a GPU (CI) the kernel runs in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by conftest.py); on a GPU it runs for real, and
the GPU-only properties at the end run too.
"""
import pytest
import torch

import rainfusion_core as rf
from helpers import random_dense, triton_device


DEVICE = triton_device()
ON_GPU = DEVICE == "cuda"

# Parity on the shared case list is in test_parity.py; this file holds what is particular to Triton.


@pytest.mark.parametrize(
    "dtype, dim, block_size, match",
    [
        (torch.float64, 64, 128, "dtype torch.float64 is not supported"),
        (torch.float16, 8, 128, "head dim 8 is not supported \\(16..256 are\\)"),
        (torch.float16, 320, 128, "head dim 320 is not supported"),
        (torch.float16, 64, 24, "mask block size 24 is not a multiple of 16"),
    ],
)
def test_refusals_name_the_reason(dtype, dim, block_size, match):
    q = torch.randn(1, 1, 48, dim, dtype=dtype, device=DEVICE)
    mask = rf.BlockMask.from_dense(
        torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), block_size=block_size, q_len=48, kv_len=48
    ) if block_size == 24 else rf.BlockMask.from_dense(
        torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), block_size=block_size, q_len=48, kv_len=48
    )
    with pytest.raises(rf.UnsupportedInputError, match=match):
        rf.block_sparse_attention(q, q, q, mask, backend="triton")


def test_interpreter_is_never_chosen_automatically_on_cpu():
    if ON_GPU:
        pytest.skip("CPU-interpreter property")
    assert rf.get_backend("cpu").name != "triton"


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and the sync check need a GPU")
def test_no_host_sync_and_cuda_graph_replay():
    q, k, v = (torch.randn(1, 4, 4000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense = random_dense(1, 4, 32, 32).cuda()
    mask = rf.BlockMask.from_dense(dense, block_size=128, q_len=4000, kv_len=4000)
    backend = rf.get_backend("triton")
    first = backend.forward(q, k, v, mask, 0.1)  # compile outside the checks
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.forward(q, k, v, mask, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = backend.forward(q, k, v, mask, 0.1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)


def test_launch_plans_are_made_once_per_class_of_calls():
    from rainfusion_core.backends.triton import launch

    q, k, v = (torch.randn(1, 2, 300, 32, device=DEVICE) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 3, 3, dtype=torch.bool, device=DEVICE), block_size=128,
                                   q_len=300, kv_len=300)
    out = torch.empty_like(q)
    first = launch.plan_launch(q, k, v, out, mask, None)
    q2 = torch.randn_like(q)  # new values, same class: the same plan object
    assert launch.plan_launch(q2, k, v, out, mask, None) is first
    strided = torch.randn(1, 300, 2, 32, device=DEVICE).transpose(1, 2)  # other strides: planned anew
    assert launch.plan_launch(strided, k, v, out, mask, None) is not first
    options = launch.TritonOptions(kernel="triton", config=first.config)
    assert launch.plan_launch(q, k, v, out, mask, None, options) is not first


def test_the_old_launcher_keywords_still_work_and_warn():
    from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton

    q, k, v = (torch.randn(1, 2, 200, 32, device=DEVICE) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE), block_size=128,
                                   q_len=200, kv_len=200)
    want = block_sparse_attention_triton(q, k, v, mask, 0.2, options=TritonOptions(kernel="triton"))
    with pytest.warns(DeprecationWarning, match="pass options=TritonOptions"):
        got = block_sparse_attention_triton(q, k, v, mask, 0.2, kernel="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['kernal'\\]"):
        block_sparse_attention_triton(q, k, v, mask, 0.2, kernal="triton")
