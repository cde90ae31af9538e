"""RainFusion2.0 sparse attention vs dense attention on the best device present.

    python examples/demo.py [--device cuda] [--frames 8 --height 16 --width 32] [--sparsity 0.8]

Prints the time of dense SDPA and of ``rf.sparse_attention`` on one video
layer, and the error of the sparse output against the dense one and against
the float64 golden of the same mask.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import rainfusion_core as rf
from rainfusion_core.benchmarking import median_ms
from rainfusion_core.synthetic import video_like_qkv


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: best present)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--backend", default=None, help="backend name or device string (default: automatic)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = args.device or best_device()
    on_gpu = device.startswith("cuda")
    # CPU default: 8x16x32 = 4096 tokens; GPU default: Wan2.1-1.3B 480p (21x30x52 = 32760 tokens).
    frames, height, width = (21, 30, 52) if on_gpu else (8, 16, 32)
    layout = rf.VideoLayout(args.frames or frames, args.height or height, args.width or width)
    heads = args.heads or (12 if on_gpu else 4)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    q, k, v = video_like_qkv(layout, heads, args.head_dim, device=device, dtype=dtype)

    dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats=args.repeats)
    sparse = lambda: rf.sparse_attention(q, k, v, layout, sparsity=args.sparsity, backend=args.backend)  # noqa: E731
    sparse_ms = median_ms(sparse, device, repeats=args.repeats)

    out, dense = sparse().double(), F.scaled_dot_product_attention(q, k, v).double()
    perm = rf.build_permutation(layout, device)
    qp, kp, vp = (perm.apply(x, 2) for x in (q, k, v))
    mask = rf.predict_block_mask(qp, kp, layout, sparsity=args.sparsity)
    golden = perm.undo(rf.block_sparse_attention(qp.double(), kp.double(), vp.double(), mask, backend="torch"), 2)
    chosen = rf.get_backend(args.backend) if args.backend else rf.get_backend(device)

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    print(f"device {device}, backend {chosen.name}, {dtype}, B=1 H={heads} S={layout.seq_len} D={args.head_dim}")
    print(f"layout {layout}")
    print(f"sparsity {args.sparsity}: mask density {mask.density:.3f} (first-frame sink on)")
    print()
    print(f"{'what':<36}{'ms':>10}")
    print(f"{'dense SDPA':<36}{dense_ms:>10.2f}")
    print(f"{'rf.sparse_attention (whole call)':<36}{sparse_ms:>10.2f}")
    print(f"{'speed-up over dense':<36}{dense_ms / sparse_ms:>10.2f}x")
    print()
    print(f"relative L2 error vs dense attention : {rel(out, dense):.4f}  (the price of sparsity)")
    print(f"relative L2 error vs float64 golden  : {rel(out, golden):.2e}  (kernel numerics, same mask)")
    cos = F.cosine_similarity(out.flatten(), dense.flatten(), dim=0)
    print(f"cosine similarity vs dense attention : {float(cos):.4f}")


if __name__ == "__main__":
    main()
