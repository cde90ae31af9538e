"""The library's own host time per call, with a backend that does no work (any machine, no GPU needed).

    python benchmarks/host_path_bench.py            # eager calls
    python benchmarks/host_path_bench.py --profile  # and where the time goes (cProfile)

A backend named ``null`` is registered for the CPU: its mask predictor and its attention
return tensors made once, so what is timed is everything else a call does (checks, the
permutation lookup, backend selection, the op boundary, the pooled-scores product, the
output allocation). As a plugin the null backend's output is NaN-filled before each call
(the guard against rows a plugin leaves unwritten); ``--writes-every-row`` declares it
writes every row, as the built-in ``triton`` backend does, and times the call without that
fill. The kernels' own launch costs on a GPU come on top:
``benchmarks/call_overhead_bench.py`` measures the whole call there.
"""
from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import time

import torch

import rainfusion_core as rf
from rainfusion_core.backend import Backend, MaskPredictor


class _NullPredictor(MaskPredictor):
    def __init__(self):
        self.cache = {}

    def block_means(self, x, block_size, order):
        key = ("means", tuple(x.shape), block_size)
        if key not in self.cache:
            self.cache[key] = torch.zeros(*x.shape[:2], -(-x.shape[2] // block_size), x.shape[3])
        return self.cache[key]

    def select_blocks(self, scores, *, scale, keep, sink_blocks, text_blocks):
        key = ("mask", tuple(scores.shape))
        if key not in self.cache:
            dense = torch.ones(scores.shape, dtype=torch.bool)
            mask = rf.BlockMask.from_dense(dense, block_size=1, q_len=scores.shape[2], kv_len=scores.shape[3])
            self.cache[key] = (mask.dense, mask.kv_counts, mask.kv_indices)
        return self.cache[key]


class NullBackend(Backend):
    """Attention that returns zeros made once: only the library's host work is left to time."""

    name = "null"
    device_types = ("cpu",)
    priority = -100

    def __init__(self):
        self.predictor = _NullPredictor()
        self.out = {}

    def forward(self, q, k, v, block_mask, scale):
        if tuple(q.shape) not in self.out:
            self.out[tuple(q.shape)] = torch.zeros_like(q)
        return self.out[tuple(q.shape)]

    def model_order_attention(self):
        return lambda q, k, v, block_mask, scale, order, out: None

    def mask_predictor(self, dtype):
        return self.predictor


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="also print where sparse_attention's time goes")
    parser.add_argument("--writes-every-row", action="store_true",
                        help="declare the null backend's model-order function writes every row, as the built-in "
                             "triton backend does, so the output is not NaN-filled first (the built-in cost)")
    args = parser.parse_args()
    NullBackend.writes_every_row = args.writes_every_row
    torch.set_num_threads(1)
    layout = rf.VideoLayout(2, 16, 16, text_len=64)
    q, k, v = (torch.randn(1, layout.seq_len, 4, 64) for _ in range(3))
    with rf.scoped_backends(NullBackend()):
        calls = {
            "sparse_attention (BSND)": lambda: rf.sparse_attention(q, k, v, layout, tensor_layout="BSND",
                                                                   backend="null"),
        }
        plan = rf.plan_sparse_attention(q, k, layout, tensor_layout="BSND", backend="null")
        calls["plan.run (BSND)"] = lambda: plan.run(q, k, v)
        qp, kp, vp = (x.transpose(1, 2) for x in (q, k, v))
        calls["block_sparse_attention"] = lambda: rf.block_sparse_attention(qp, kp, vp, plan.block_mask,
                                                                            backend="null")
        print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"S={layout.seq_len}, 4 heads of 64, one thread")
        print(f"{'call':<28} {'host µs per call':>18}")
        for name, fn in calls.items():
            print(f"{name:<28} {per_call_us(fn, args.calls):>18.1f}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                calls["sparse_attention (BSND)"]()
            profiler.disable()
            pstats.Stats(profiler).strip_dirs().sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
