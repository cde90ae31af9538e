"""RainFusion2.0 sparse attention against dense attention on the best device present.

    python examples/demo.py [--device cuda] [--frames 21 --height 16 --width 24] [--sparsity 0.8]

One attention layer of a video DiT on synthetic video-like q/k/v: 21 latent
frames as Wan2.1 has, a grid small enough for a CPU (21x16x24 = 8064 tokens,
4 heads, head dim 64) or, on a GPU, Wan2.1-1.3B's 480p grid (21x30x52 = 32760
tokens, 12 heads, head dim 128). Prints the backend that runs (and, for the
C++ CPU kernel, the instruction set and threads it runs with), the mask
density, the time of dense SDPA and of the whole ``rf.sparse_attention`` call
(permutation, mask prediction and attention), and the error of the sparse
output against dense attention and against the float64 golden of the same mask.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import rainfusion_core as rf
from rainfusion_core.benchmarking import device_name, median_ms
from rainfusion_core.call import crossover_reason
from rainfusion_core.cli import POSITIVE, sparsity_option
from rainfusion_core.progress import progress
from rainfusion_core.registry import select_backend
from rainfusion_core.synthetic import video_like_qkv

CPU_SHAPE = dict(frames=21, height=16, width=24, heads=4, head_dim=64)
GPU_SHAPE = dict(frames=21, height=30, width=52, heads=12, head_dim=128)


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_backend(backend: rf.Backend) -> str:
    if backend.name == "cpu":
        from rainfusion_core.backends.cpu import kernel_description

        return f"cpu (C++ kernel: {kernel_description()})"
    return backend.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu, gpu = CPU_SHAPE, GPU_SHAPE
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best present)")
    for name in ("frames", "height", "width", "heads", "head_dim"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=POSITIVE, default=None,
                            help=f"default: {cpu[name]} on a CPU, {gpu[name]} on a GPU")
    parser.add_argument("--sparsity", type=sparsity_option, default=0.8,
                        help="fraction of key blocks each query block skips (default: 0.8)")
    parser.add_argument("--backend", default=None, help="backend name or device string (default: automatic)")
    parser.add_argument("--repeats", type=POSITIVE, default=5, help="timed calls, median reported (default: 5)")
    args = parser.parse_args()

    device = args.device or best_device()
    shape = GPU_SHAPE if device.startswith("cuda") else CPU_SHAPE
    pick = lambda name: shape[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    layout = rf.VideoLayout(pick("frames"), pick("height"), pick("width"))
    heads, head_dim = pick("heads"), pick("head_dim")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    q, k, v = video_like_qkv(layout, heads, head_dim, device=device, dtype=dtype, seed=0)
    plan = rf.plan_sparse_attention(q, k, layout, sparsity=args.sparsity, backend=args.backend)
    backend = select_backend(args.backend, q, k, v, plan.block_mask)
    sink_share = 1 - (1 - layout.frame_len / layout.seq_len) ** 2 if layout.frames > 1 else 0.0

    with progress(total=3, desc="demo", unit="step") as bar:
        bar.set_postfix_str("dense SDPA")
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats=args.repeats)
        bar.update()
        bar.set_postfix_str("rf.sparse_attention")
        sparse = lambda: rf.sparse_attention(q, k, v, layout, sparsity=args.sparsity, backend=args.backend,  # noqa: E731
                                             min_tokens=0)  # the sparse path, even below the dense crossover
        sparse_ms = median_ms(sparse, device, repeats=args.repeats)
        bar.update()
        bar.set_postfix_str("float64 golden")
        out, dense = sparse().double(), F.scaled_dot_product_attention(q, k, v).double()
        perm = rf.build_permutation(layout, device)
        qp, kp, vp = (perm.apply(x.double(), 2) for x in (q, k, v))
        golden = perm.undo(rf.block_sparse_attention(qp, kp, vp, plan.block_mask, backend="torch"), 2)
        bar.update()

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"device  {device} ({device_name(device)}), {dtype}, B=1 H={heads} S={layout.seq_len} D={head_dim}, "
          "synthetic video-like q/k/v")
    print(f"layout  {layout.frames} frames x {layout.height} x {layout.width} latent grid")
    print(f"backend {describe_backend(backend)}")
    print(f"mask    sparsity {args.sparsity}: density {plan.density:.3f} of the tiles kept "
          f"(the first-frame sink alone keeps {sink_share:.3f})")
    print()
    print(f"{'what':<48}{'ms':>10}")
    print(f"{'dense SDPA':<48}{dense_ms:>10.2f}")
    print(f"{'rf.sparse_attention (permute, predict, attend)':<48}{sparse_ms:>10.2f}")
    verdict = "faster" if dense_ms > sparse_ms else "SLOWER"
    print(f"{'speed-up over dense':<48}{dense_ms / sparse_ms:>9.2f}x  (sparse is {verdict})")
    print()
    print(f"relative L2 error vs dense attention : {rel(out, dense):.4f}  (the price of sparsity)")
    print(f"relative L2 error vs float64 golden  : {rel(out, golden):.2e}  (kernel numerics, same mask)")
    cos = F.cosine_similarity(out.flatten(), dense.flatten(), dim=0)
    print(f"cosine similarity vs dense attention : {float(cos):.4f}")
    dense_why = crossover_reason(torch.device(device).type, layout, args.sparsity, 128, None, None)
    if args.backend is None and dense_why:
        print(f"\nby default rf.sparse_attention runs dense attention here: {dense_why} (min_tokens=0 forces sparse)")


if __name__ == "__main__":
    main()
