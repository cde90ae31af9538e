"""One WanTransformer3DModel forward (Wan2.1-T2V-1.3B config, random bf16 weights): dense vs RainFusion.

    python benchmarks/wan_e2e_bench.py [--grids 480p,720p] [--repeats 3]

Latent 16 x 21 x 60 x 104 (480p, 81 frames) and 16 x 21 x 90 x 160 (720p); text
context 512 x 4096. Dense runs diffusers' default attention and cuDNN SDPA
forced; RainFusion runs at sparsity 0.8 with the first-frame sink on the Triton
backend, with its fused q/k prologue (RMS norm + rotary in one Triton pass) and,
for attribution, with diffusers' eager prologue. The prologue alone is timed
too (eager vs fused, both tensors of all 30 layers). Times are medians of
CUDA-event timings after a warm-up forward.
"""
from __future__ import annotations

import argparse

import torch
from diffusers import WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.benchmarking import event_median_ms
from rainfusion_core.integrations.diffusers import apply_rainfusion

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
GRIDS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}


def timed(fn, repeats: int) -> float:
    return event_median_ms(fn, repeats=repeats)


def _rotate_pairs(x, cos, sin):
    """Wan's rotary embedding as diffusers computes it: rotate (even, odd) channel pairs."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


def prologue_times(model, layout, repeats: int) -> tuple[float, float]:
    """One tensor's q/k prologue (RMS norm across heads, then rotary) of block 0: eager and fused, ms."""
    from rainfusion_core.backends.triton.wan_prologue import rms_norm_rope

    attn = model.blocks[0].attn1
    frames, height, width = layout.frames, layout.height, layout.width
    x = torch.randn(1, layout.seq_len, attn.heads * 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = model.rope(torch.empty(1, 16, frames, height * 2, width * 2, device="cuda"))
    tables = tuple(t.reshape(layout.seq_len, -1).float().contiguous() for t in (cos, sin))
    with torch.no_grad():
        eager = timed(lambda: _rotate_pairs(attn.norm_q(x).unflatten(2, (attn.heads, -1)), cos, sin), repeats)
        fused = timed(lambda: rms_norm_rope(x, attn.norm_q.weight, attn.norm_q.eps, *tables, attn.heads), repeats)
    return eager, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", default="480p,720p")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    rows = []
    for grid in args.grids.split(","):
        frames, height, width = GRIDS[grid]
        latent = torch.randn(1, 16, frames, height, width, device="cuda", dtype=torch.bfloat16)
        t = torch.tensor([500.0], device="cuda")
        layout = rf.VideoLayout(frames, height // 2, width // 2)

        def forward():
            with torch.no_grad():
                return model(latent, t, text, return_dict=False)[0]

        default_ms = timed(forward, args.repeats)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = timed(forward, args.repeats)
        handle = apply_rainfusion(model, sparsity=0.8, backend="triton", fuse_prologue=True)
        sparse_ms = timed(forward, args.repeats)
        handle.remove()
        handle = apply_rainfusion(model, sparsity=0.8, backend="triton", fuse_prologue=False)
        eager_prologue_ms = timed(forward, args.repeats)
        handle.remove()
        prologue_eager, prologue_fused = (30 * 2 * ms for ms in prologue_times(model, layout, args.repeats))

        q, k, v = (torch.randn(1, layout.seq_len, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            attn_dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), args.repeats)
        attn_sparse = timed(lambda: rf.sparse_attention(q, k, v, layout, tensor_layout="BSND", backend="triton"),
                            args.repeats)
        rows += [
            f"| {grid} (S={layout.seq_len}) | dense, diffusers default | {default_ms:.0f} ms | "
            f"{cudnn_ms / default_ms:.2f} |",
            f"| {grid} (S={layout.seq_len}) | dense, cuDNN SDPA | {cudnn_ms:.0f} ms | 1.00 | "
            f"attention {100 * 30 * attn_dense / cudnn_ms:.0f} % of the forward |",
            f"| {grid} (S={layout.seq_len}) | RainFusion 0.8 (triton) | {sparse_ms:.0f} ms | {cudnn_ms / sparse_ms:.2f} | "
            f"attention {100 * 30 * attn_sparse / sparse_ms:.0f} % of the forward |",
            f"| {grid} (S={layout.seq_len}) | RainFusion 0.8, diffusers' eager q/k prologue | {eager_prologue_ms:.0f} ms | "
            f"{cudnn_ms / eager_prologue_ms:.2f} | |",
            f"| {grid} (S={layout.seq_len}) | q/k prologue alone, 30 layers: eager / fused | "
            f"{prologue_eager:.0f} / {prologue_fused:.0f} ms | | |",
        ]
        print("\n".join(rows[-5:]), flush=True)
    print("\n==== summary (speed-up over cuDNN dense) ====\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
