"""The Hopper kernel's schedules side by side: the measurement behind each entry of ``SCHEDULES``.

    python benchmarks/schedules_bench.py [--shapes cogvideox-5b,wan-1.3b] [--precisions bf16,fp8] [--rounds 2]
    # needs an NVIDIA Hopper GPU

``SCHEDULES`` (``backends/triton/hopper/attention.py``) says per precision and head dim whether a
consumer holds its wait for ``P_t V_t`` behind the next tile's softmax (the late wait), how many of
P's exponentials a polynomial on the FMA units computes (none, one in four, one in two), whether
a warp skips O's rescale when no row's maximum moved, and whether a tile's k slot is freed together
with the previous tile's v slot. Per shape (batch 1, bf16 synthetic video-DiT activations, inputs
already permuted, the mask predicted at sparsity 0.8) this runs the kernel with
the table's schedule and each schedule that differs from it in one field (six in all), on the same
inputs, every schedule timed once per round and the rounds in turn, so slow drift of the GPU's
clocks hits all of them alike. Prints each schedule's times (``triton.testing.do_bench`` medians),
its best TFLOP/s on kept blocks, and the largest difference of its output from the table's
schedule, whose row is marked. Change ``SCHEDULES`` only where a schedule wins in every round.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

import rainfusion_core as rf
from rainfusion_core.benchmarking import (
    hopper_kernel_operands, kernel_bench_args, median_ms, print_summary, synthetic_video_problem,
)
from rainfusion_core.shapes import KERNEL_SHAPES, kernel_shape

SHAPES = {name: kernel_shape(name) for name in KERNEL_SHAPES}  # heads, head dim, layout
SHAPES["d64-wan-1.3b-grid"] = (24, 64, rf.VideoLayout(21, 30, 52))  # head dim 64 on a longer sequence
PRECISIONS = ("bf16", "fp8")
POLY_EVERY = (0, 4, 2)


def neighbours(table) -> list:
    """The table's schedule first, then each schedule that differs from it in one field."""
    variants = [table]
    variants += [dataclasses.replace(table, poly_every=poly) for poly in POLY_EVERY if poly != table.poly_every]
    variants.append(dataclasses.replace(table, late_wait=not table.late_wait))
    variants.append(dataclasses.replace(table, rescale_skip=not table.rescale_skip))
    variants.append(dataclasses.replace(table, joint_release=not table.joint_release))
    return variants


def measure(name: str, precisions, rounds: int) -> list[str]:
    from rainfusion_core.backends.triton.hopper import attention as ws

    heads, head_dim, layout = SHAPES[name]
    seq = layout.seq_len
    _, _, _, _, (qp, kp, vp), mask = synthetic_video_problem(layout, heads, head_dim, "cuda")
    counts, indices = mask.kv_counts.contiguous(), mask.kv_indices.contiguous()
    ident = torch.arange(seq, device="cuda")  # the inputs are permuted already
    tflop = 4 * heads * seq * seq * head_dim * mask.token_density() / 1e12
    scale = head_dim ** -0.5
    rows = []
    for precision in precisions:
        fp8 = precision == "fp8"
        k_op, v_op, extra = hopper_kernel_operands(kp, vp, precision)  # what the call passes the kernel
        args = (qp, k_op, v_op)
        table = ws.SCHEDULES[fp8, head_dim]
        variants = neighbours(table)
        times = {s: [] for s in variants}
        outs = {}
        try:
            for _ in range(rounds):
                for schedule in variants:
                    ws.SCHEDULES[fp8, head_dim] = schedule
                    out = outs[schedule] = torch.empty_like(qp)
                    times[schedule].append(median_ms(
                        lambda: ws.launch(*args, out, counts, indices, ident, scale, **extra), "cuda", repeats=10))
        finally:
            ws.SCHEDULES[fp8, head_dim] = table
        for schedule in variants:
            diff = (outs[schedule].float() - outs[table].float()).abs().max().item()
            mark = " **(table)**" if schedule == table else ""
            rows.append(f"| {name} | d{head_dim} {precision} | poly_every={schedule.poly_every} "
                        f"late_wait={schedule.late_wait} rescale_skip={schedule.rescale_skip} "
                        f"joint_release={schedule.joint_release}{mark} | "
                        + " / ".join(f"{t:.3f}" for t in times[schedule])
                        + f" ms | {tflop / min(times[schedule]) * 1e3:.0f} | {diff:.1e} |")
            print(rows[-1], flush=True)
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names, precisions, rounds = kernel_bench_args(parser, SHAPES, PRECISIONS, default_shapes="cogvideox-5b,wan-1.3b",
                                                  rounds_help="times each schedule is timed, in turn (default 2)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [row for name in names for row in measure(name, precisions, rounds)]
    print_summary(["shape", "kernel", "schedule", "times per round", "best TFLOP/s (kept blocks)",
                   "max abs difference from the table's"], rows)


if __name__ == "__main__":
    main()
