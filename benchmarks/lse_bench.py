"""What returning the log-sum-exp costs, and a ring step's share, on one GPU at the Wan2.1 shapes.

    python benchmarks/lse_bench.py [--shapes wan1.3b,wan14b]     # needs an NVIDIA GPU

Per shape (batch 1, head dim 128, bf16, sparsity 0.8, a mask predicted from synthetic
video-DiT activations, ``rainfusion_core.synthetic``):

* the kernel on model-order q, k, v (read through the permutation), without and with ``lse``,
  timed in turn three times each (medians); the target is a cost of at most 2 %;
* the whole ``rf.sparse_attention`` call without and with ``return_lse=True``, likewise;
* rank 0's share of a ring of 2 and 4 (its query blocks against every key shard, one
  kernel per shard with ``lse``, and the merge), run on this one GPU: what a ring rank
  computes, without the collectives, against the kernel on the whole permuted sequence.

Times are ``triton.testing.do_bench`` medians after warm-up.
"""
from __future__ import annotations

import argparse

import torch

import rainfusion_core as rf
from rainfusion_core.backends.triton.launch import block_sparse_attention_triton
from rainfusion_core.benchmarking import comma_choices, median_ms, synthetic_video_problem
from rainfusion_core.shapes import REFERENCE_HEAD_DIM as HEAD_DIM
from rainfusion_core.shapes import REFERENCE_SHAPES


def bench(fn) -> float:
    return median_ms(fn, "cuda", repeats=10)


def ring_share(qp, kp, vp, mask, scale, degree: int):
    """Rank 0's work in a ring of ``degree`` (``rainfusion_core.ring``: blocks dealt to the ranks in turn): its
    query blocks against each rank's key blocks, one kernel per shard with ``lse``, merged."""
    nb = mask.kv_counts.shape[-1]
    blocks = [torch.arange(j, nb, degree, device=qp.device) for j in range(degree)]
    tokens = [(b[:, None] * 128 + torch.arange(128, device=qp.device)).flatten() for b in blocks]
    tokens = [t[t < qp.shape[2]] for t in tokens]
    rows = mask.dense.index_select(2, blocks[0])
    masks = [rf.BlockMask.from_dense(rows.index_select(3, b), block_size=128, q_len=tokens[0].numel(),
                                     kv_len=t.numel()) for b, t in zip(blocks, tokens)]
    q = qp.index_select(2, tokens[0])
    ks = [(kp.index_select(2, t), vp.index_select(2, t)) for t in tokens]

    def run():
        parts = [rf.block_sparse_attention(q, k, v, m, scale=scale, backend="triton", return_lse=True)
                 for (k, v), m in zip(ks, masks)]
        return rf.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    return run


def alternating(first, second, rounds: int = 3) -> tuple[float, float]:
    """Medians of ``first`` and ``second`` timed in turn ``rounds`` times each (clock drift hits both alike)."""
    times = [[], []]
    for _ in range(rounds):
        for i, fn in enumerate((first, second)):
            times[i].append(bench(fn))
    return tuple(sorted(t)[len(t) // 2] for t in times)


def measure(name: str) -> list[str]:
    _, heads, frames, height, width, text = REFERENCE_SHAPES[name]
    layout = rf.VideoLayout(frames, height, width, text_len=text)
    print(f"== {name}", flush=True)
    q, k, v, perm, (qp, kp, vp), mask = synthetic_video_problem(layout, heads, HEAD_DIM, "cuda")
    scale = HEAD_DIM ** -0.5
    order = perm.indices
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    plain, with_lse = alternating(lambda: block_sparse_attention_triton(q, k, v, mask, scale, order=order, out=out),
                                  lambda: block_sparse_attention_triton(q, k, v, mask, scale, order=order, out=out,
                                                                        lse=lse))
    call, call_lse = alternating(lambda: rf.sparse_attention(q, k, v, layout, sparsity=0.8, backend="triton"),
                                 lambda: rf.sparse_attention(q, k, v, layout, sparsity=0.8, backend="triton",
                                                             return_lse=True))
    whole_kernel = bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale))
    shares = [bench(ring_share(qp, kp, vp, mask, scale, d)) for d in (2, 4)]
    return [f"| {name} | {plain:.3f} | {with_lse:.3f} | {100 * (with_lse / plain - 1):+.1f} % | {call:.3f} | "
            f"{call_lse:.3f} | {whole_kernel:.3f} | {shares[0]:.3f} ({whole_kernel / shares[0]:.2f}x) | "
            f"{shares[1]:.3f} ({whole_kernel / shares[1]:.2f}x) |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="wan1.3b,wan14b",
                        help=f"comma-separated, of: {', '.join(REFERENCE_SHAPES)}")
    args = parser.parse_args()
    names = comma_choices(parser, "--shapes", args.shapes, REFERENCE_SHAPES)
    if not torch.cuda.is_available():
        parser.error("needs an NVIDIA GPU")
    rows = []
    for name in names:
        rows += measure(name)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; times in ms (do_bench medians)")
    print("| shape | kernel | kernel + lse | lse cost | call | call + lse | permuted kernel | ring 2: rank 0's share "
          "| ring 4: rank 0's share |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
