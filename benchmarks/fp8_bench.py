"""FP8 against bf16 on Hopper at the Wan2.1 shapes: kernel throughput, whole call, error.

    python benchmarks/fp8_bench.py [--models wan-1.3b,wan-14b]     # needs an NVIDIA Hopper GPU

Per shape (batch 1, head dim 128, bf16 inputs, sparsity 0.8, one mask predicted from
synthetic video-DiT activations, ``rainfusion_core.synthetic``):

* kept-block throughput of the Hopper kernel alone in bf16 and in FP8 on the same mask, q/k/v
  already permuted, on the operands a call passes it (``benchmarking.hopper_kernel_operands``: 16-bit
  k/v as they are, FP8 k/v quantised); "+ quantise" is the FP8 call on permuted inputs,
  the k/v quantisation pass included;
* the whole ``rf.sparse_attention`` call (prediction, permutation, quantisation, kernel)
  in both precisions, against dense cuDNN attention in bf16;
* the FP8 output against the bf16 sparse output (cosine, relative L2), and each against
  dense bf16 attention, so what sparsity and what precision cost can be read apart.

Times are ``triton.testing.do_bench`` medians after warm-up; TFLOP/s count kept blocks.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.backends.triton.launch import block_sparse_attention_triton
from rainfusion_core.benchmarking import comma_choices, hopper_kernel_call, median_ms, synthetic_video_problem

MODELS = {  # heads, latent grid of a 81-frame video (480p / 720p), no text in self-attention
    "wan-1.3b": (12, rf.VideoLayout(21, 30, 52)),
    "wan-14b": (40, rf.VideoLayout(21, 45, 80)),
}
HEAD_DIM = 128


def bench(fn) -> float:
    return median_ms(fn, "cuda", repeats=10)


def compare(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    x, ref = x.flatten().float(), ref.flatten().float()
    return float(F.cosine_similarity(x, ref, dim=0)), float((x - ref).norm() / ref.norm())


def measure(name: str) -> list[str]:
    heads, layout = MODELS[name]
    seq = layout.seq_len
    print(f"== {name}", flush=True)
    q, k, v, perm, (qp, kp, vp), mask = synthetic_video_problem(layout, heads, HEAD_DIM, "cuda")
    density = mask.token_density()
    scale = HEAD_DIM ** -0.5
    kept_tflop = 4 * heads * seq * seq * HEAD_DIM * density / 1e12

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        dense_out = F.scaled_dot_product_attention(q, k, v)
    times = {
        "bf16 kernel": bench(hopper_kernel_call(qp, kp, vp, mask, scale, "bf16")),
        "fp8 kernel": bench(hopper_kernel_call(qp, kp, vp, mask, scale, "fp8")),
        "fp8 kernel + quantise": bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale,
                                                                             precision="fp8")),
        "bf16 whole call": bench(lambda: rf.sparse_attention(q, k, v, layout, backend="triton")),
        "fp8 whole call": bench(lambda: rf.sparse_attention(q, k, v, layout, backend="triton", precision="fp8")),
    }
    sparse_bf16 = rf.sparse_attention(q, k, v, layout, backend="triton")
    sparse_fp8 = rf.sparse_attention(q, k, v, layout, backend="triton", precision="fp8")
    full = rf.BlockMask.from_dense(torch.ones_like(mask.dense), block_size=128, q_len=seq, kv_len=seq)
    dense_fp8 = perm.undo(block_sparse_attention_triton(qp, kp, vp, full, scale, precision="fp8"), 2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; mask density {density:.3f}; "
          f"cuDNN dense {cudnn:.2f} ms ({4 * heads * seq * seq * HEAD_DIM / cudnn / 1e9:.0f} TFLOP/s)")
    rows = [f"| {name} | {what} | {ms:.2f} ms | {kept_tflop / ms * 1e3:.0f} | {cudnn / ms:.2f}× |"
            for what, ms in times.items()]
    rows.append(f"| {name} | fp8 / bf16 kernel throughput | | **{times['bf16 kernel'] / times['fp8 kernel']:.2f}×** | |")
    errors = [("fp8 sparse vs bf16 sparse", compare(sparse_fp8, sparse_bf16)),
              ("bf16 sparse vs dense bf16", compare(sparse_bf16, dense_out)),
              ("fp8 sparse vs dense bf16", compare(sparse_fp8, dense_out)),
              ("fp8 dense vs dense bf16", compare(dense_fp8, dense_out))]
    rows += [f"| {name} | {what} | cosine {cos:.5f} | rel L2 {rel:.4f} | |" for what, (cos, rel) in errors]
    print("\n".join(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    args = parser.parse_args()
    names = comma_choices(parser, "--models", args.models, MODELS)
    rows = []
    for name in names:
        rows += measure(name)
    print("\n==== summary ====")
    print("| shape | what | time | TFLOP/s (kept blocks) | × cuDNN dense bf16 |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
