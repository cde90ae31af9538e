"""Run the Hopper kernel alone at one shape and precision, for a profiler to capture.

    ncu --clock-control none --kernel-name regex:fwd_ws --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy \\
        python benchmarks/hopper_profile.py --shape wan-1.3b --precision bf16
    # pipes busy and stall reasons, as BENCHMARKS.md's table has them:
    M=regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio
    M=$M,regex:sm__inst_executed_pipe_.*.avg.pct_of_peak_sustained_active
    M=$M,regex:sm__pipe_.*_cycles_active.avg.pct_of_peak_sustained_active
    ncu --clock-control none --kernel-name regex:fwd_ws --launch-skip 1 --launch-count 1 --metrics "$M" \\
        python benchmarks/hopper_profile.py --shape wan-1.3b --precision bf16
    # needs an NVIDIA Hopper GPU

The inputs are what the kernel benchmarks use (batch 1, bf16 synthetic video-DiT activations, already
permuted, the mask predicted at sparsity 0.8), and the kernel gets the operands a call passes it
(``benchmarking.hopper_kernel_call``: 16-bit k/v as they are, or FP8's quantised ones),
made once before the launches, so the profiler sees the attention kernel and nothing of the call around
it (the kernel-name filter leaves the copy or quantisation kernels out). What to read in the report: the
tensor pipe's share of peak (``ComputeWorkloadAnalysis``), the cycles between a warp's instructions and
what it waited on (``WarpStateStats``: ``long scoreboard`` for loads, ``math pipe throttle`` for a busy
unit, ``barrier`` and ``wait`` for the consumers' barriers and the tensor cores), and how often a
scheduler found no eligible warp (``SchedulerStats``).
"""
from __future__ import annotations

import argparse

import torch

from rainfusion_core.benchmarking import hopper_kernel_call, require_hopper, synthetic_video_problem
from rainfusion_core.precision import PRECISIONS
from rainfusion_core.shapes import KERNEL_SHAPES, kernel_shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan-1.3b", choices=list(KERNEL_SHAPES), help="default wan-1.3b")
    parser.add_argument("--precision", default=PRECISIONS[0], choices=PRECISIONS, help=f"default {PRECISIONS[0]}")
    parser.add_argument("--launches", type=int, default=4,
                        help="kernel launches after the operands are made (default 4; ncu skips the first)")
    args = parser.parse_args()
    if args.launches < 1:
        parser.error(f"--launches: at least 1, got {args.launches}")
    require_hopper(parser)
    heads, head_dim, layout = kernel_shape(args.shape)
    _, _, _, _, (qp, kp, vp), mask = synthetic_video_problem(layout, heads, head_dim, "cuda")
    launch = hopper_kernel_call(qp, kp, vp, mask, head_dim ** -0.5, args.precision)
    for _ in range(args.launches):
        launch()
    torch.cuda.synchronize()
    print(f"{args.shape}, {args.precision}, head dim {head_dim}: {args.launches} launches, "
          f"mask density {mask.token_density():.3f}")


if __name__ == "__main__":
    main()
