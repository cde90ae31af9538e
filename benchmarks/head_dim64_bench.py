"""Head dim 64 on Hopper: the CogVideoX-5B attention shape, our kernels against cuDNN and FlexAttention.

    python benchmarks/head_dim64_bench.py        # needs an NVIDIA Hopper GPU

48 heads, head dim 64, 13×30×45 latent tokens + 226 text tokens, bf16, sparsity 0.8 (the
mask predicted from random q/k). The Hopper kernel row times the kernel alone on the operands a
call passes it (``benchmarking.hopper_kernel_call``: k and v as they are); the portable
kernel's row is the call on permuted inputs. Times are do_bench-style medians; TFLOP/s count the kept
blocks only. FlexAttention runs compiled, with the same mask converted to its BlockMask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton
from rainfusion_core.benchmarking import hopper_kernel_call, median_ms

HEADS, HEAD_DIM = 48, 64
LAYOUT = rf.VideoLayout(13, 30, 45, text_len=226)


def bench(fn) -> float:
    return median_ms(fn, "cuda", repeats=20)


def main() -> None:
    seq = LAYOUT.seq_len
    q, k, v = (torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    perm = rf.build_permutation(LAYOUT, "cuda")
    qp, kp, vp = (perm.apply(x, 2) for x in (q, k, v))
    mask = rf.predict_block_mask(qp, kp, LAYOUT, sparsity=0.8)
    density = mask.token_density()
    scale = HEAD_DIM ** -0.5
    flops = 4 * HEADS * seq * seq * HEAD_DIM

    def tflops(ms, fraction=1.0):
        return flops * fraction / ms / 1e9

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    ws = bench(hopper_kernel_call(qp.contiguous(), kp.contiguous(), vp.contiguous(), mask, scale))  # kernel alone
    portable = bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale,
                                                           options=TritonOptions(kernel="triton")))
    whole = bench(lambda: rf.sparse_attention(q, k, v, LAYOUT, backend="triton"))
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    flex_mask = mask.to_flex_block_mask()
    flex = bench(lambda: compiled(qp, kp, vp, block_mask=flex_mask, scale=scale))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; S={seq}, mask density {density:.3f}")
    print("| what | time | TFLOP/s (kept blocks) | × cuDNN dense |")
    print("|---|---|---|---|")
    for name, ms, fraction in (("cuDNN dense", cudnn, 1.0), ("Hopper kernel (ws)", ws, density),
                               ("portable Triton kernel", portable, density),
                               ("whole `rf.sparse_attention`", whole, density),
                               ("FlexAttention, same mask", flex, density)):
        print(f"| {name} | {ms:.3f} ms | {tflops(ms, fraction):.0f} | {cudnn / ms:.2f}× |")


if __name__ == "__main__":
    main()
