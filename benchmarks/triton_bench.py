"""Triton backend on a CUDA GPU: parity, a configuration sweep, and the comparison table.

    python benchmarks/triton_bench.py [--shapes wan1.3b,wan14b] [--sweep] [--no-flex]

The sparse rows time the default kernel through the call on permuted inputs (the warp-specialised
one on sm_90, see ``backends/triton/hopper/attention.py``, which reads them in place); the portable
Triton kernel has its own row, and the sweep tunes it. For each reference shape of docs/design.md (bf16, head dim 128) the mask is the one
RainFusion2.0 predicts at sparsity 0.8 with the first-frame sink on. Times are
``triton.testing.do_bench`` medians after warm-up; TFLOP/s counts kept blocks only
(4 * B * H * S^2 * D * token density). FlexAttention is compiled once, its block
mask built outside the timed region.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton
from rainfusion_core.backends.triton.attention import KernelConfig
from rainfusion_core.benchmarking import median_ms
from rainfusion_core.parity import parity
from rainfusion_core.shapes import REFERENCE_SHAPES

PORTABLE = TritonOptions(kernel="triton")
SHAPES = REFERENCE_SHAPES  # name: (B, heads, frames, height, width, text tokens)
SWEEP = [KernelConfig(*c) for c in [
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3),
    (64, 128, 4, 3), (64, 128, 4, 2), (64, 64, 4, 4),
]]


def bench(fn) -> float:
    return median_ms(fn, "cuda", repeats=10)


def check_parity() -> list[str]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for q_len, kv_len, hq, hkv in [(4001, 4001, 8, 8), (3999, 4097, 8, 2), (4096, 4096, 8, 4)]:
            q = torch.randn(1, hq, q_len, 128, dtype=torch.float64, device="cuda")
            k, v = (torch.randn(1, hkv, kv_len, 128, dtype=torch.float64, device="cuda") for _ in range(2))
            nq, nk = -(-q_len // 128), -(-kv_len // 128)
            dense = torch.rand(1, hq, nq, nk, device="cuda") < 0.3
            dense[0, 0, 3] = False
            mask = rf.BlockMask.from_dense(dense, block_size=128, q_len=q_len, kv_len=kv_len)
            golden = rf.block_sparse_attention(q, k, v, mask, backend="torch")
            low = [x.to(dtype) for x in (q, k, v)]
            ref_lp = rf.block_sparse_attention(*low, mask, backend="torch")
            out = rf.block_sparse_attention(*low, mask, backend="triton")
            rows.append(f"parity {str(dtype):15} {q_len}x{kv_len} Hq={hq} Hkv={hkv}: {parity(out, golden, ref_lp)}")
    return rows


def run_shape(name: str, sweep: bool, flex: bool) -> list[str]:
    batch, heads, frames, height, width, text = SHAPES[name]
    layout = rf.VideoLayout(frames, height, width, text_len=text)
    seq = layout.seq_len
    q, k, v = (torch.randn(batch, heads, seq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    perm = rf.build_permutation(layout, "cuda")
    qp, kp, vp = (perm.apply(x, 2) for x in (q, k, v))
    mask = rf.predict_block_mask(qp, kp, layout, sparsity=0.8)
    density = mask.token_density()
    full = rf.BlockMask.from_dense(torch.ones_like(mask.dense), block_size=128, q_len=seq, kv_len=seq)
    scale = 128 ** -0.5
    flops = 4 * batch * heads * seq * seq * 128
    rows = []
    tf = lambda ms, d=1.0: flops * d / ms / 1e9  # noqa: E731

    ours = bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale))
    ours_full = bench(lambda: block_sparse_attention_triton(qp, kp, vp, full, scale))
    portable = bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale, options=PORTABLE))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fa2 = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    flex_ms = float("nan")
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention)
        flex_mask = mask.to_flex_block_mask()
        flex_ms = bench(lambda: compiled(qp, kp, vp, block_mask=flex_mask, scale=scale))
        flex_out = compiled(qp, kp, vp, block_mask=flex_mask, scale=scale)
        ours_out = block_sparse_attention_triton(qp, kp, vp, mask, scale)
        rows.append(f"{name}: max|ours - flex| = {float((ours_out.float() - flex_out.float()).abs().max()):.3e}")

    rows.append(f"{name}: S={seq} H={heads} mask density {density:.3f} (tiles {mask.density:.3f})")
    rows.append(f"| {name} | sparse d={density:.2f} | {ours:.3f} ms | {tf(ours, density):.0f} TFLOP/s | "
                f"flex/ours {flex_ms / ours:.2f} | cudnn/ours {cudnn / ours:.2f} | fa2/ours {fa2 / ours:.2f} |")
    rows.append(f"| {name} | full d=1.00 | {ours_full:.3f} ms | {tf(ours_full):.0f} TFLOP/s | "
                f"ours/cudnn throughput {cudnn / ours_full:.2f} |")
    rows.append(f"| {name} | flex sparse | {flex_ms:.3f} ms | {tf(flex_ms, density):.0f} TFLOP/s |")
    rows.append(f"| {name} | cuDNN dense | {cudnn:.3f} ms | {tf(cudnn):.0f} TFLOP/s |")
    rows.append(f"| {name} | FA2 dense | {fa2:.3f} ms | {tf(fa2):.0f} TFLOP/s |")
    rows.append(f"| {name} | sparse, portable Triton kernel | {portable:.3f} ms | {tf(portable, density):.0f} TFLOP/s |")
    no_tma = bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale, options=replace(PORTABLE, use_tma=False)))
    rows.append(f"{name}: pointer path (no TMA) {no_tma:.3f} ms {tf(no_tma, density):.0f} TFLOP/s")
    if sweep:
        for config in SWEEP:
            try:
                ms = bench(lambda: block_sparse_attention_triton(qp, kp, vp, mask, scale, options=replace(PORTABLE, config=config)))
                rows.append(f"sweep {name} {config}: {ms:.3f} ms {tf(ms, density):.0f} TFLOP/s")
            except Exception as exc:  # a config that does not fit shared memory is reported, not fatal
                rows.append(f"sweep {name} {config}: failed ({type(exc).__name__}: {str(exc)[:80]})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="wan1.3b,wan14b")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-parity", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    rows = [] if args.no_parity else check_parity()
    for row in rows:
        print(row, flush=True)
    for name in args.shapes.split(","):
        shape_rows = run_shape(name, args.sweep, not args.no_flex)
        for row in shape_rows:
            print(row, flush=True)
        rows += shape_rows
    print("\n==== summary ====")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
