"""Breakdown of one ``rf.sparse_attention`` call on a CUDA GPU, against dense SDPA.

    python benchmarks/whole_call_bench.py [--shapes wan1.3b,wan14b]

bf16, head dim 128, sparsity 0.8, first-frame sink on, inputs and output in the
model's order (BNSD). Stages are timed separately with do_bench medians.
Prediction reads q and k through the permutation; the kernel reads query rows
through it and writes output rows back through it. On sm_90 the default kernel
is the warp-specialised one, which streams k and v from permuted copies made a
few heads at a time; the "portable Triton" rows time the other kernel, and the
"copies" rows time the path other backends take, for comparison. Extra memory is the
peak allocated during one call minus what was allocated before it (inputs
excluded, the output included).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.benchmarking import hopper_kernel_call, median_ms
from rainfusion_core.shapes import REFERENCE_SHAPES
from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton
from rainfusion_core.backends.triton.permute import gather_rows
from rainfusion_core.prediction import predict_mask

PORTABLE = TritonOptions(kernel="triton")
PORTABLE_COPIES = TritonOptions(kernel="triton", gather_kv=False)  # k and v as permuted copies, streamed by TMA


def bench(fn) -> float:
    return median_ms(fn, "cuda", repeats=10)


def _ws_one_launch(q, k, v, mask, scale, order):
    from rainfusion_core.backends.triton.hopper import attention as gluon_attention

    out = torch.empty_like(q)
    k_perm, v_perm = gather_rows(order, k, v)
    gluon_attention.launch(q, k_perm, v_perm, out, mask.kv_counts, mask.kv_indices, order, scale)
    return out


def run(name: str) -> list[str]:
    batch, heads, frames, height, width, _ = REFERENCE_SHAPES[name]
    layout = rf.VideoLayout(frames, height, width)
    q, k, v = (torch.randn(batch, heads, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    perm = rf.build_permutation(layout, "cuda")
    order = perm.indices
    qp, kp, vp = (perm.apply(x, 2) for x in (q, k, v))
    predict = dict(sparsity=0.8, block_size=128, first_frame_sink=None, scale=None, share_batch_mask=False)
    mask = predict_mask(q, k, layout, order, backend="triton", **predict)
    reference = predict_mask(qp, kp, layout, None, backend="torch", **predict)
    differ = int((mask.dense != reference.dense).sum())
    scale = 128 ** -0.5
    out_p = block_sparse_attention_triton(qp, kp, vp, mask, scale)
    plan = rf.plan_sparse_attention(q, k, layout, sparsity=0.8, backend="triton")
    call = lambda: rf.sparse_attention(q, k, v, layout, sparsity=0.8, backend="triton")  # noqa: E731
    same_out = bool(torch.equal(call(), perm.undo(out_p, 2)))

    times = {
        "prediction, fused (reads model order)": bench(
            lambda: predict_mask(q, k, layout, order, backend="triton", **predict)),
        "prediction, eager reference (on permuted copies)": bench(
            lambda: predict_mask(qp, kp, layout, None, backend="torch", **predict)),
        "kernel (default; sm_90: warp-specialised, k/v copied a head chunk at a time)": bench(
            lambda: block_sparse_attention_triton(q, k, v, mask, scale, order=order)),
        "kernel, warp-specialised, k/v copied whole, one launch": bench(
            lambda: _ws_one_launch(q, k, v, mask, scale, order)),
        "kernel, portable Triton, q/k/v/out through the permutation": bench(
            lambda: block_sparse_attention_triton(q, k, v, mask, scale, order=order, options=PORTABLE)),
        "kernel, portable Triton, k/v gathered copies": bench(
            lambda: block_sparse_attention_triton(q, k, v, mask, scale, order=order, options=PORTABLE_COPIES)),
        "kernel alone, warp-specialised, on permuted copies": bench(
            hopper_kernel_call(qp, kp, vp, mask, scale)),
        "copies: gather k, v (Triton)": bench(lambda: gather_rows(order, k, v)),
        "copies: permute q, k, v (index_select)": bench(lambda: (perm.apply(q, 2), perm.apply(k, 2), perm.apply(v, 2))),
        "copies: inverse permutation of out (index_select)": bench(lambda: perm.undo(out_p, 2)),
        "whole call (eager)": bench(call),
        "plan.run (mask reused)": bench(lambda: plan.run(q, k, v)),
    }
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        predict_mask(q, k, layout, order, backend="triton", **predict)
    times["prediction, fused, CUDA graph (GPU time alone)"] = bench(graph.replay)
    graph = torch.cuda.CUDAGraph()
    call()
    with torch.cuda.graph(graph):
        call()
    times["whole call (CUDA graph)"] = bench(graph.replay)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = bench(lambda: F.scaled_dot_product_attention(q, k, v))

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    qkv = 3 * q.numel() * q.element_size()

    rows = [f"{name}: S={layout.seq_len} H={heads}, mask density {mask.density:.3f}; "
            f"cuDNN dense {cudnn:.3f} ms, flash dense {flash:.3f} ms; tiles where fused and reference masks differ: {differ} of {mask.dense.numel()}; "
            f"whole call == kernel on copies: {same_out}"]
    for what, ms in times.items():
        rows.append(f"| {name} | {what} | {ms:.3f} ms | {100 * ms / cudnn:.1f} % of cuDNN | "
                    f"cuDNN/this {cudnn / ms:.2f} | flash/this {flash / ms:.2f} |")
    rows.append(f"| {name} | extra memory of one call | {extra / 2**20:.0f} MiB | q+k+v = {qkv / 2**20:.0f} MiB | "
                f"ratio {extra / qkv:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="wan1.3b,wan14b")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = []
    for name in args.shapes.split(","):
        rows += run(name)
        print("\n".join(rows[-17:]), flush=True)
    print("\n==== summary ====\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
