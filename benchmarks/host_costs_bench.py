"""What the host pays per primitive on this machine's GPU path: the floor under a sparse call's host time.

    python benchmarks/host_costs_bench.py        # needs a CUDA GPU

Each primitive is issued back to back after a warm-up and timed on the host (microseconds
per call): a CUDA allocation, a view, a Triton launch through ``JITFunction`` and the same
compiled kernel launched directly, a small batched matmul, mask prediction and a whole
sparse call at the Flux 1024² shape (24 heads of 128, 4608 tokens, bf16, sparsity 0.8,
``triton`` backend). A call's host time cannot drop below the sum of what it issues.
"""
from __future__ import annotations

import torch

import rainfusion_core as rf
from rainfusion_core.benchmarking import host_us


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("host_costs_bench: needs a CUDA GPU")
    from rainfusion_core.backends.triton import prediction

    x = torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(1, 24, 36, 36, device="cuda")
    dense = torch.empty(scores.shape, dtype=torch.int8, device="cuda")
    counts = torch.empty(scores.shape[:3], dtype=torch.int32, device="cuda")
    indices = torch.empty(scores.shape, dtype=torch.int32, device="cuda")
    args = (scores, dense, counts, indices, 24 * 36, 36, 36, 8, 0.1, 2, 4)
    grid = (54,)
    compiled = prediction.select_blocks_kernel[grid](*args, ROWS=16, COLS=64, num_warps=2)
    layout = rf.VideoLayout(1, 64, 64, text_len=512)
    rows = [
        ("torch.empty (CUDA, 28 MB)", host_us(lambda: torch.empty(x.shape, device="cuda", dtype=x.dtype), 2000)),
        ("Tensor.transpose", host_us(lambda: x.transpose(1, 2), 2000)),
        ("Triton launch through JITFunction (select kernel)",
         host_us(lambda: prediction.select_blocks_kernel[grid](*args, ROWS=16, COLS=64, num_warps=2), 2000)),
        ("the same compiled kernel launched directly",
         host_us(lambda: compiled[(54, 1, 1)](*args, 16, 64, stream=torch._C._cuda_getCurrentRawStream(0)), 2000)),
        ("batched matmul [24, 36, 36]", host_us(lambda: scores @ scores, 2000)),
        ("rf.predict_block_mask, Flux 1024²",
         host_us(lambda: rf.predict_block_mask(x, x, layout, sparsity=0.8, backend="triton"), 300)),
        ("rf.sparse_attention, Flux 1024²",
         host_us(lambda: rf.sparse_attention(x, x, x, layout, sparsity=0.8, backend="triton"), 300)),
    ]
    print(f"host time per call, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| primitive | µs |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
