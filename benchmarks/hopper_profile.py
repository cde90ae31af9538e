"""Run the Hopper kernel alone at one shape and precision, for a profiler to capture.

    ncu --kernel-name regex:fwd_ws --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        --section SchedulerStats --section Occupancy \\
        python benchmarks/hopper_profile.py --shape wan-1.3b --precision bf16
    # needs an NVIDIA Hopper GPU

The inputs are what the kernel benchmarks use (batch 1, bf16 synthetic video-DiT activations, already
permuted, the mask predicted at sparsity 0.8), and the kernel gets the operands a call passes it
(``benchmarking.hopper_kernel_operands``: 16-bit k/v padded to whole blocks, or FP8's quantised ones),
made once before the launches, so the profiler sees the attention kernel and nothing of the call around
it. What to read in the report: the tensor pipe's share of peak (``ComputeWorkloadAnalysis``), the
cycles between a warp's instructions and what it waited on (``WarpStateStats``: ``long scoreboard``
for loads, ``math pipe throttle`` for a busy unit, ``barrier`` and ``wait`` for the consumers'
barriers and the tensor cores), and how often a scheduler found no eligible warp (``SchedulerStats``).
"""
from __future__ import annotations

import argparse

import torch

from rainfusion_core.benchmarking import hopper_kernel_operands, require_hopper, synthetic_video_problem
from rainfusion_core.shapes import KERNEL_SHAPES, kernel_shape

PRECISIONS = ("bf16", "fp8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan-1.3b", choices=list(KERNEL_SHAPES), help="default wan-1.3b")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS, help="default bf16")
    parser.add_argument("--launches", type=int, default=4,
                        help="kernel launches after the operands are made (default 4; skip the first in ncu)")
    args = parser.parse_args()
    if args.launches < 1:
        parser.error(f"--launches: at least 1, got {args.launches}")
    require_hopper(parser)
    from rainfusion_core.backends.triton.hopper import attention as ws

    heads, head_dim, layout = kernel_shape(args.shape)
    _, _, _, _, (qp, kp, vp), mask = synthetic_video_problem(layout, heads, head_dim, "cuda")
    counts, indices = mask.kv_counts.contiguous(), mask.kv_indices.contiguous()
    order = torch.arange(layout.seq_len, device="cuda")  # the inputs are permuted already
    k_op, v_op, extra = hopper_kernel_operands(kp, vp, args.precision)
    out = torch.empty_like(qp)
    for _ in range(args.launches):
        ws.launch(qp, k_op, v_op, out, counts, indices, order, head_dim ** -0.5, **extra)
    torch.cuda.synchronize()
    print(f"{args.shape}, {args.precision}, head dim {head_dim}: {args.launches} launches, "
          f"mask density {mask.token_density():.3f}")


if __name__ == "__main__":
    main()
