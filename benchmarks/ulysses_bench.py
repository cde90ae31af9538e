"""One Wan forward on N GPUs under diffusers' Ulysses context parallelism: dense vs RainFusion 0.8.

    torchrun --nproc_per_node N benchmarks/ulysses_bench.py --model wan-14b [--save out.pt | --reference out.pt]

N = 1 runs without parallelism. Dense is diffusers' attention with cuDNN first in SDPA's
priority (under Ulysses: diffusers' all-to-all around it); RainFusion is
``apply_rainfusion(model, sparsity=0.8, backend="triton")`` under the same degree. Rank 0
prints the forward times (CUDA-event medians after a warm-up), each rank's time inside
the sparse attention during one forward (heads differ in density), and, with
``--reference``, how far the sparse output is from a saved single-GPU one.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from models_e2e_bench import DENSE, MODELS, build  # noqa: E402

from rainfusion_core.benchmarking import event_median_ms  # noqa: E402
from rainfusion_core.integrations.diffusers import apply_rainfusion  # noqa: E402
from rainfusion_core.integrations.diffusers.sites import SparseSite  # noqa: E402


def attention_times(model, forward) -> float:
    """This rank's milliseconds inside the sparse attention (after the exchange) during one forward."""
    events = []
    inner = SparseSite._attend

    def timed(self, *args, **kwargs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(self, *args, **kwargs)
        stop.record()
        events.append((start, stop))
        return out

    SparseSite._attend = timed
    try:
        forward()
    finally:
        SparseSite._attend = inner
    torch.cuda.synchronize()
    return sum(a.elapsed_time(b) for a, b in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan-1.3b", choices=[m for m in MODELS if m.startswith("wan")])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--save", help="write the sparse output here (a single-GPU reference)")
    parser.add_argument("--reference", help="compare the sparse output with this saved one")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
    spec = MODELS[args.model]
    model = build(spec)
    torch.manual_seed(1)
    kwargs = spec.inputs()
    if world > 1:
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    def forward():
        with torch.no_grad(), sdpa_kernel(DENSE, set_priority=True):
            return model(**kwargs, return_dict=False)[0]

    dense_ms = event_median_ms(forward, repeats=args.repeats)
    handle = apply_rainfusion(model, sparsity=0.8, backend="triton")
    sparse_ms = event_median_ms(forward, repeats=args.repeats)
    out = forward()
    mine = torch.tensor([attention_times(model, forward)], device="cuda")
    handle.remove()
    spread = [mine]
    if world > 1:
        spread = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(spread, mine)
    if rank == 0:
        per_rank = [float(t) for t in spread]
        line = (f"| {args.model} | {world} | {dense_ms:.0f} ms | {sparse_ms:.0f} ms | **{dense_ms / sparse_ms:.2f}x** | "
                f"{min(per_rank):.0f}-{max(per_rank):.0f} ms |")
        if args.save:
            torch.save(out.float().cpu(), args.save)
        if args.reference:
            ref = torch.load(args.reference)
            got = out.float().cpu()
            line += f" max abs diff to 1 GPU {float((got - ref).abs().max()):.3g} (output scale {float(ref.abs().max()):.3g})"
        print(line, flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
