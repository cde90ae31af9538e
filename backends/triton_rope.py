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

    Channel ``c = h * HEAD_DIM + d`` pairs with ``c ^ 1``: even ``d`` gets
    ``y[c] cos[d] - y[c+1] sin[d+1]``, odd ``d`` gets ``y[c-1] sin[d] + y[c] cos[d-1]``.
    """
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * ROWS + tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    partner = offs_c ^ 1
    ok = (offs_s < length)[:, None] & (offs_c < CHANNELS)[None, :]
    rows = X + b * stride_xb + offs_s.to(tl.int64)[:, None] * stride_xs

    # -- RMS norm over all heads of the token, rounded to the input dtype like torch.nn.RMSNorm
    x = tl.load(rows + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    x_partner = tl.load(rows + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / CHANNELS + eps)[:, None]
    y = x * rstd
    y_partner = x_partner * rstd
    if HAS_WEIGHT:
        c_ok = offs_c < CHANNELS
        y = y * tl.load(W + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        y_partner = y_partner * tl.load(W + partner, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y = y.to(Out.dtype.element_ty).to(tl.float32)
    y_partner = y_partner.to(Out.dtype.element_ty).to(tl.float32)

    # -- rotate each (even, odd) pair by the token's angle for that pair
    d = offs_c % HEAD_DIM
    angles = offs_s[:, None] * HEAD_DIM
    cos = tl.load(COS + angles + (d & ~1)[None, :], mask=ok, other=0.0)
    sin = tl.load(SIN + angles + (d | 1)[None, :], mask=ok, other=0.0)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
    out = y * cos + sign * (y_partner * sin)

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
