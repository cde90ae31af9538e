"""CPU kernel vs dense SDPA and the torch backend, across mask densities.

    python benchmarks/cpu_bench.py [--threads 2] [--seq 4096] [--heads 4] [--head-dim 64]

Masks keep exactly round(density * NK) random key blocks per query block
(128-token blocks). Times are medians of --repeats runs after one warm-up. The
kernel's rate is also given as a share of ``torch.mm``'s float32 rate (2048³, same
threads, measured in the same run). The kernel's instruction set is the CPU's best
unless ``RAINFUSION_CPU_ISA`` forces one; ``MKL_ENABLE_INSTRUCTIONS=AVX2`` does the
same for ``torch.mm``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import rainfusion_core as rf
from rainfusion_core.backends import cpu as cpu_module
from rainfusion_core.benchmarking import median_ms


def random_mask(batch, heads, length, block_size, density):
    n = -(-length // block_size)
    keep = max(1, round(density * n))
    order = torch.rand(batch, heads, n, n).argsort(dim=-1)[..., :keep]
    dense = torch.zeros(batch, heads, n, n, dtype=torch.bool).scatter_(-1, order, True)
    return rf.BlockMask.from_dense(dense, block_size=block_size, q_len=length, kv_len=length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--densities", default="0.1,0.2,0.3,0.5,0.7,1.0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = (1, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    cpu, ref = rf.get_backend(name="cpu"), rf.get_backend("torch")
    sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), "cpu", repeats=args.repeats)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_gflops = 2 * 2048**3 / median_ms(lambda: a @ b, "cpu", repeats=args.repeats) / 1e6

    print(f"torch {torch.__version__}, {args.threads} threads, float32, B=1 H={args.heads} "
          f"S={args.seq} D={args.head_dim}, block 128")
    print(f"kernel: {cpu_module.kernel_description()}")
    print(f"dense SDPA: {sdpa_ms:.2f} ms; torch.mm 2048^3: {mm_gflops:.1f} GFLOP/s")
    print(f"{'density':>8} {'cpu ms':>9} {'torch ms':>9} {'SDPA/cpu':>9} {'torch/cpu':>10} {'GFLOP/s':>8} {'of mm':>6}")
    for density in (float(d) for d in args.densities.split(",")):
        mask = random_mask(1, args.heads, args.seq, 128, density)
        cpu_ms = median_ms(lambda: rf.block_sparse_attention(q, k, v, mask, backend=cpu), "cpu", repeats=args.repeats)
        ref_ms = median_ms(lambda: rf.block_sparse_attention(q, k, v, mask, backend=ref), "cpu", repeats=max(1, args.repeats // 2))
        flops = 4 * args.heads * args.seq**2 * args.head_dim * mask.token_density()
        gflops = flops / cpu_ms / 1e6
        print(f"{mask.density:>8.2f} {cpu_ms:>9.2f} {ref_ms:>9.2f} {sdpa_ms / cpu_ms:>9.2f} "
              f"{ref_ms / cpu_ms:>10.2f} {gflops:>8.1f} {100 * gflops / mm_gflops:>5.0f}%")


if __name__ == "__main__":
    main()
