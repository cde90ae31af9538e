"""Triton RMS norm across heads followed by interleaved rotary embedding, in one pass.

This is the prologue of Wan's self-attention (``norm_q``/``norm_k`` then
``apply_rotary_emb``): diffusers runs it as about ten elementwise passes, the
rotary ones in float64 because its angle tables are float64. Here one program
reads ROWS token rows of the projection once and writes ``[B, S, H, D]``.

Rounding points follow diffusers: the normalised row is rounded to the input
dtype (as ``torch.nn.RMSNorm`` returns it), the rotation runs in float32 (not
float64) and is rounded once more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 4  # tokens per program


@triton.jit
def rms_norm_rope_kernel(
    X, W, COS, SIN, Out,
    stride_xb, stride_xs, length, eps,
    CHANNELS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """``Out[b, s, c] = rope(rms_norm(X[b, s, :])[c])`` for ROWS tokens ``s`` of batch item ``b``.

    Channel ``c = h * HEAD_DIM + d``; the pair ``(2p, 2p + 1)`` of channels becomes
    ``(y[2p] cos[2p] - y[2p+1] sin[2p+1], y[2p] sin[2p+1] + y[2p+1] cos[2p])`` with the
    token's angles at head-dim index ``d``.
    """
    PAIRS: tl.constexpr = BLOCK_C // 2
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * ROWS + tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    s_ok = offs_s < length
    ok = s_ok[:, None] & (offs_c < CHANNELS)[None, :]
    rows = X + b * stride_xb + offs_s.to(tl.int64)[:, None] * stride_xs

    # -- RMS norm over all heads of the token, rounded to the input dtype like torch.nn.RMSNorm
    x = tl.load(rows + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 1) / CHANNELS + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + offs_c, mask=offs_c < CHANNELS, other=0.0).to(tl.float32)[None, :]
    y = y.to(Out.dtype.element_ty).to(tl.float32)

    # -- rotate each (even, odd) channel pair by the token's angle for that pair
    y_even, y_odd = tl.split(tl.reshape(y, (ROWS, PAIRS, 2)))
    offs_p = tl.arange(0, PAIRS)
    p_ok = s_ok[:, None] & (offs_p < CHANNELS // 2)[None, :]
    angles = offs_s[:, None] * HEAD_DIM + (2 * offs_p % HEAD_DIM)[None, :]
    cos = tl.load(COS + angles, mask=p_ok, other=0.0)
    sin = tl.load(SIN + angles + 1, mask=p_ok, other=0.0)
    out = tl.reshape(tl.join(y_even * cos - y_odd * sin, y_even * sin + y_odd * cos), (ROWS, BLOCK_C))

    dst = Out + (b * length + offs_s.to(tl.int64))[:, None] * CHANNELS + offs_c[None, :]
    tl.store(dst, out.to(Out.dtype.element_ty), mask=ok)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, heads: int,
) -> torch.Tensor:
    """``rope(rms_norm(x))`` as a contiguous ``[B, S, H, D]`` tensor.

    Args:
        x: ``[B, S, H * D]`` projection output, last dim contiguous.
        weight: ``[H * D]`` RMS norm weight, or ``None``.
        cos, sin: ``[S, D]`` float32 contiguous angle tables (Wan's repeat-interleaved ones).
    """
    batch, length, channels = x.shape
    head_dim = channels // heads
    if x.stride(-1) != 1:
        raise ValueError(f"x: the channel dim must be contiguous, got strides {tuple(x.stride())}")
    if head_dim % 2 or head_dim * heads != channels:
        raise ValueError(f"x: {channels} channels do not split into {heads} heads of an even head dim")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (length, head_dim) or table.dtype != torch.float32 or not table.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous float32 [{length}, {head_dim}] table, "
                             f"got {table.dtype} {tuple(table.shape)}")
    out = torch.empty(batch, length, heads, head_dim, device=x.device, dtype=x.dtype)
    block_c = triton.next_power_of_2(channels)
    rows = max(1, min(_ROWS, 8192 // block_c))
    grid = (triton.cdiv(length, rows), batch)
    rms_norm_rope_kernel[grid](
        x, weight if weight is not None else x, cos, sin, out,
        x.stride(0), x.stride(1), length, eps,
        CHANNELS=channels, HEAD_DIM=head_dim, BLOCK_C=block_c, ROWS=rows, HAS_WEIGHT=weight is not None,
        num_warps=4 if block_c <= 2048 else 8,
    )
    return out
