"""Where a sparse call's time goes at the model shapes: GPU time, host time per call, and the GPU-only time.

    python benchmarks/call_overhead_bench.py                 # needs a CUDA GPU
    python benchmarks/call_overhead_bench.py --profile Flux  # where one shape's host time goes (cProfile)

For each shape (Flux 1024², LTX-Video, CogVideoX-5B, Wan2.1-1.3B 480p; batch 1, bf16,
random q/k/v, sparsity 0.8, Triton backend): dense cuDNN SDPA, the whole
``rf.sparse_attention`` call, the host time per call when calls are issued back to back,
and the same call replayed in a CUDA graph (no host work: what the GPU alone needs).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.benchmarking import event_median_ms, host_us

SHAPES = {
    "Flux 1024²": (rf.VideoLayout(1, 64, 64, text_len=512), 24, 128),
    "LTX-Video 768×512×121": (rf.VideoLayout(16, 16, 24), 32, 64),
    "CogVideoX-5B": (rf.VideoLayout(13, 30, 45, text_len=226), 48, 64),
    "Wan2.1-1.3B 480p": (rf.VideoLayout(21, 30, 52), 12, 128),
}


def graphed_ms(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return event_median_ms(graph.replay, repeats=20)


def profile(name: str, calls: int = 300) -> None:
    """cProfile of warm calls at the first shape whose name starts with ``name``: the host time by function."""
    shape = next((s for s in SHAPES if s.startswith(name)), None)
    if shape is None:
        raise SystemExit(f"--profile: no shape starts with {name!r}; expected one of {list(SHAPES)}")
    layout, heads, dim = SHAPES[shape]
    q, k, v = (torch.randn(1, layout.seq_len, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = lambda: rf.sparse_attention(q, k, v, layout, tensor_layout="BSND", backend="triton")  # noqa: E731
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"{shape}: {calls} warm calls")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", metavar="SHAPE", help="profile the host time of one shape instead")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile)
        return
    rows = []
    for name, (layout, heads, dim) in SHAPES.items():
        q, k, v = (torch.randn(1, layout.seq_len, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def dense():
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2))

        def sparse():
            return rf.sparse_attention(q, k, v, layout, tensor_layout="BSND", backend="triton")

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = event_median_ms(dense, repeats=20)
        rows.append(f"| {name} (S={layout.seq_len}, {heads}×{dim}) | {dense_ms:.2f} ms | "
                    f"{event_median_ms(sparse, repeats=20):.2f} ms | {host_us(sparse):.0f} µs | "
                    f"{graphed_ms(sparse):.2f} ms |")
        print(rows[-1], flush=True)
    print("\n| shape | dense cuDNN | whole sparse call | host time per sparse call | in a CUDA graph |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
