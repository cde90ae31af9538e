"""What the Hopper kernel spends per kept tile and per program: where its throughput target is lost.

    python benchmarks/tile_cost_bench.py [--shapes wan-1.3b,cogvideox-5b] [--precisions bf16,fp8]
    # needs an NVIDIA Hopper GPU

Per shape (batch 1, bf16 synthetic video-DiT activations, inputs already permuted, the mask
predicted at sparsity 0.8) the kernel runs on masks in which every row keeps exactly ``N`` tiles
(the first ``N`` of the predicted row's list: its kept tiles, then skipped ones where it keeps
fewer), for ``N`` from 0 to 128. A straight line through the times for ``N >= 4`` splits the kernel
into a cost per kept tile, whose rate (TFLOP/s counting the tile's two products) is what the tile
loop alone reaches, and a fixed cost, shown per program as it repeats once per wave of programs
(one program per SM at a time): gathering q, storing O, starting and ending the pipeline. The
predicted mask itself is timed too, with the rate it would reach if the fixed cost were zero.
Times are ``triton.testing.do_bench`` medians after warm-up.
"""
from __future__ import annotations

import argparse

import torch

from rainfusion_core.benchmarking import (
    hopper_kernel_operands, kernel_bench_args, median_ms, print_summary, synthetic_video_problem,
)
from rainfusion_core.shapes import KERNEL_SHAPES, kernel_shape

SHAPES = {name: kernel_shape(name) for name in KERNEL_SHAPES}  # heads, head dim, layout
PRECISIONS = ("bf16", "fp8")
TILES = (0, 1, 2, 4, 16, 64, 128)
FIT_FROM = 4  # below this the pipeline is not yet full; the line is fitted to N >= FIT_FROM


def measure(name: str, precisions, rounds: int) -> list[str]:
    from rainfusion_core.backends.triton.hopper import attention as ws

    heads, head_dim, layout = SHAPES[name]
    seq = layout.seq_len
    _, _, _, _, (qp, kp, vp), mask = synthetic_video_problem(layout, heads, head_dim, "cuda")
    counts, indices = mask.kv_counts.contiguous(), mask.kv_indices.contiguous()
    programs, n_blocks = counts.numel(), counts.shape[-1]
    waves = -(-programs // torch.cuda.get_device_properties(0).multi_processor_count)
    tile_flop = 4 * ws.BLOCK * ws.BLOCK * head_dim
    ident = torch.arange(seq, device="cuda")  # the inputs are permuted already
    scale = head_dim ** -0.5
    out = torch.empty_like(qp)
    rows = []
    for precision in precisions:
        k_op, v_op, extra = hopper_kernel_operands(kp, vp, precision)  # what the call passes the kernel

        def run(row_counts):
            return min(median_ms(lambda: ws.launch(qp, k_op, v_op, out, row_counts, indices, ident, scale, **extra),
                                 "cuda", repeats=10) for _ in range(rounds))

        times = {n: run(torch.full_like(counts, n)) for n in TILES if n <= n_blocks}
        fitted = [n for n in times if n >= FIT_FROM]
        design = torch.tensor([[1.0, n] for n in fitted], dtype=torch.float64)
        fixed_ms, tile_ms = torch.linalg.lstsq(design, torch.tensor([[times[n]] for n in fitted],
                                                                    dtype=torch.float64)).solution.flatten().tolist()
        real_ms = run(counts)
        kept_tflop = int(counts.sum()) * tile_flop / 1e12
        loop_tflops = programs * tile_flop / (tile_ms * 1e-3) / 1e12
        rows.append(f"| {name} | d{head_dim} {precision} | {programs} programs, {waves} waves | "
                    + " ".join(f"{n}:{t:.3f}" for n, t in times.items())
                    + f" | {fixed_ms / waves * 1e3:.2f} | {loop_tflops:.0f} | {real_ms:.3f} ms, "
                      f"{kept_tflop / real_ms * 1e3:.0f} | {kept_tflop / (real_ms - fixed_ms) * 1e3:.0f} |")
        print(rows[-1], flush=True)
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names, precisions, rounds = kernel_bench_args(parser, SHAPES, PRECISIONS, default_shapes="wan-1.3b,cogvideox-5b",
                                                  rounds_help="timings per mask; the fastest counts (default 2)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [row for name in names for row in measure(name, precisions, rounds)]
    print_summary(["shape", "kernel", "programs", "ms with N tiles per row (N:ms)", "fixed cost per program (us)",
                   "tile loop TFLOP/s", "predicted mask: time, TFLOP/s (kept)",
                   "predicted mask without the fixed cost"], rows)


if __name__ == "__main__":
    main()
