"""Where sparse attention starts to beat dense attention: the numbers behind ``rainfusion_core/crossover.py``.

    python benchmarks/crossover_bench.py                    # CPU: float32, 4 heads of 64
    python benchmarks/crossover_bench.py --device cuda      # GPU: bf16, 24 heads of 128

For latent grids of growing size (``frames x height x width``, no text) and a few sparsities,
the median time of dense SDPA and of the whole ``rf.sparse_attention`` call forced sparse
(``min_tokens=0``), and which of the two the crossover rule picks with its defaults. A row
where the rule picks the slower path is marked ``<-- wrong side``.
"""
from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

import rainfusion_core as rf
from rainfusion_core.benchmarking import device_name, median_ms
from rainfusion_core.call import crossover_reason

GRIDS = [(4, 16, 32), (6, 16, 32), (8, 16, 32), (12, 16, 32), (16, 16, 32), (21, 16, 24), (21, 16, 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sparsities", default="0.5,0.8")
    parser.add_argument("--grids", help="comma-separated FxHxW grids (default: 4x16x32 ... 21x16x32)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    heads, dim, dtype = (24, 128, torch.bfloat16) if cuda else (4, 64, torch.float32)
    what = device_name(device)
    print(f"{what}; {dtype}, {heads} heads of {dim}, block 128, first-frame sink on")
    print(f"{'grid':>12} {'tokens':>7} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>10} {'speed-up':>9}  rule picks")
    grids = [tuple(int(n) for n in g.split("x")) for g in args.grids.split(",")] if args.grids else GRIDS
    for grid in grids:
        layout = rf.VideoLayout(*grid)
        q, k, v = (torch.randn(1, heads, layout.seq_len, dim, device=device, dtype=dtype) for _ in range(3))
        dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats=args.repeats)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            sparse_ms = median_ms(lambda: rf.sparse_attention(q, k, v, layout, sparsity=sparsity, min_tokens=0),
                                  device, repeats=args.repeats)
            dense_pick = crossover_reason(device.type, layout, sparsity, 128, None, None) is not None
            wrong = (sparse_ms < dense_ms) == dense_pick
            print(f"{'x'.join(map(str, grid)):>12} {layout.seq_len:>7} {sparsity:>8.2f} {dense_ms:>9.1f} "
                  f"{sparse_ms:>10.1f} {dense_ms / sparse_ms:>8.2f}x  {'dense' if dense_pick else 'sparse'}"
                  f"{'  <-- wrong side' if wrong else ''}", flush=True)


if __name__ == "__main__":
    main()
