"""One Wan forward on N GPUs under diffusers' context parallelism: dense vs RainFusion 0.8.

    torchrun --nproc_per_node N benchmarks/ulysses_bench.py --model wan-14b [--ring R]
             [--save out.pt | --reference out.pt]

N = 1 runs without parallelism. ``--ring R`` (R divides N) runs ring attention over R ranks
under Ulysses over N / R (``--ring N``: ring alone); the default is Ulysses over all N. Dense
is diffusers' attention with cuDNN first in SDPA's priority (under Ulysses: diffusers'
all-to-all around it; under ring: diffusers' ring on its ``_native_cudnn`` backend, which
returns the log-sum-exp its ring merges); RainFusion is ``apply_rainfusion(model,
sparsity=0.8, backend="triton")`` under the same configuration. Rank 0 prints the forward
times (CUDA-event medians after a warm-up); per rank, the time of the sparse layers during
one forward (exchanges included) and the part of it in the sparse kernels, so the rest is
exchanges and host work; and, with ``--reference``, how far the sparse output is from a
saved single-GPU one. The ``--ring`` configurations have no measurement in BENCHMARKS.md yet.
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
import rainfusion_core.ring as ring_module  # noqa: E402


def _timed(owner, name: str, events: list):
    """Replace ``owner.name`` by a copy that records CUDA events around each call into ``events``; the original."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(*args, **kwargs)
        stop.record()
        events.append((start, stop))
        return out

    setattr(owner, name, timed)
    return inner


def attention_times(forward, ring: bool) -> tuple[float, float]:
    """This rank's milliseconds in the sparse layers (exchanges included) and in their kernels during one forward.

    Kernels: under Ulysses the single-device call after the exchange (prediction included); under ring
    each ring step's block-sparse call."""
    layers, kernels = [], []
    kernel_owner, kernel_name = (ring_module, "attention") if ring else (SparseSite, "_attend")
    saved = [(SparseSite, "attend", _timed(SparseSite, "attend", layers)),
             (kernel_owner, kernel_name, _timed(kernel_owner, kernel_name, kernels))]
    try:
        forward()
    finally:
        for owner, name, inner in saved:
            setattr(owner, name, inner)
    torch.cuda.synchronize()
    return tuple(sum(a.elapsed_time(b) for a, b in events) for events in (layers, kernels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan-1.3b", choices=[m for m in MODELS if m.startswith("wan")])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ring", type=int, default=1, help="ranks of ring attention (dividing N); the rest Ulysses")
    parser.add_argument("--save", help="write the sparse output here (a single-GPU reference)")
    parser.add_argument("--reference", help="compare the sparse output with this saved one")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.ring < 1 or world % args.ring:
        parser.error(f"--ring must divide the {world} ranks, got {args.ring}")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
    spec = MODELS[args.model]
    model = build(spec)
    torch.manual_seed(1)
    kwargs = spec.inputs()
    if world > 1:
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world // args.ring,
                                                              ring_degree=args.ring))
        if args.ring > 1:  # diffusers' ring merges partial results: its backend must return the log-sum-exp
            model.set_attention_backend("_native_cudnn")

    def forward():
        with torch.no_grad(), sdpa_kernel(DENSE, set_priority=True):
            return model(**kwargs, return_dict=False)[0]

    dense_ms = event_median_ms(forward, repeats=args.repeats)
    handle = apply_rainfusion(model, sparsity=0.8, backend="triton")
    sparse_ms = event_median_ms(forward, repeats=args.repeats)
    out = forward()
    mine = torch.tensor(attention_times(forward, args.ring > 1), device="cuda")
    handle.remove()
    spread = [mine]
    if world > 1:
        spread = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(spread, mine)
    if rank == 0:
        layers, kernels = [float(t[0]) for t in spread], [float(t[1]) for t in spread]
        split = f"Ulysses {world // args.ring} x ring {args.ring}" if world > 1 else "1 GPU"
        line = (f"| {args.model} | {world} ({split}) | {dense_ms:.0f} ms | {sparse_ms:.0f} ms | "
                f"**{dense_ms / sparse_ms:.2f}x** | {min(layers):.0f}-{max(layers):.0f} ms | "
                f"{min(kernels):.0f}-{max(kernels):.0f} ms |")
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
