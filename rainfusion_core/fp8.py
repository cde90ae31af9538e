"""The FP8 recipe every FP8 kernel follows, and its float64 reference.

``precision="fp8"`` (``rainfusion_core.precision``) rounds the operands of both matrix products to
float8 e4m3 and accumulates in float32, as the Hopper kernel does:

* **q**: one scale per 64 consecutive rows of the permuted order (``Q_ROWS``: half a
  128-token query block, the rows one consumer warpgroup of the kernel owns);
* **k**: one scale per mask block of keys (``block_size`` rows);
* **v**: one scale per channel (head-dim column) over the whole sequence: P·V sums
  over keys, so a v scale must not change along the keys;
* **P**: the probabilities, at most 1, times ``P_MULTIPLIER``; the row sum that
  normalises the output is taken before rounding.

Every scale is a power of two, ``2 ** (floor(log2(amax)) - 7)``: the largest value of a
group lands in [128, 256), inside e4m3's range (448), and scaling and unscaling are
exact, so kernel and reference round q, k and v to the same float8 values (P differs:
the kernel rounds it against the running maximum of its online softmax). The mask is
predicted from the unquantised inputs: it never changes with the precision.
"""
from __future__ import annotations

import torch

Q_ROWS = 64
#: the largest value of a quantised group lands in [2 ** TOP_EXPONENT, 2 ** (TOP_EXPONENT + 1))
TOP_EXPONENT = 7
#: probabilities in [0, 1] are stored as p * 256 (exact), in [0, 256]
P_MULTIPLIER = 256.0
#: group maxima below this (an all-zero group) are raised to it, so every scale is a finite power of two
MIN_AMAX = 2.0 ** -100
FP8_DTYPE = torch.float8_e4m3fn
#: what this recipe rounds both products' operands to (``precision.Precision.operand_dtype``)
OPERAND_DTYPE = FP8_DTYPE


def power_of_two_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(multiplier, descale)`` for groups whose largest magnitude is ``amax``: both powers of two,
    ``multiplier = 2 ** (7 - floor(log2 amax))`` and ``descale = 1 / multiplier``."""
    _, exponent = torch.frexp(amax.float().clamp_min(MIN_AMAX))  # amax = m * 2**exponent, m in [0.5, 1)
    top = exponent - 1  # floor(log2 amax)
    one = torch.ones(top.shape, dtype=torch.float32, device=amax.device)
    return torch.ldexp(one, TOP_EXPONENT - top), torch.ldexp(one, top - TOP_EXPONENT)


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest float8 e4m3 value, ties to even, as float32."""
    return x.to(FP8_DTYPE).to(torch.float32)


def quantize_rows(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, S, D]`` with one scale per ``rows`` consecutive rows: ``(values, descale)``.

    ``values`` are the float8 values as float32 ``[B, H, S, D]``; ``descale`` is
    ``[B, H, ceil(S / rows)]``; ``values * descale`` (per group) approximates ``x``.
    """
    batch, heads, length, dim = x.shape
    rows = min(rows, length)  # a group longer than the sequence is the sequence: memory follows S, not rows
    groups = -(-length // rows)
    padded = torch.zeros(batch, heads, groups * rows, dim, dtype=torch.float32, device=x.device)
    padded[:, :, :length] = x.float()
    grouped = padded.view(batch, heads, groups, rows, dim)
    multiplier, descale = power_of_two_scale(grouped.abs().amax(dim=(3, 4)))
    values = round_fp8(grouped * multiplier[..., None, None]).view(batch, heads, groups * rows, dim)
    return values[:, :, :length], descale


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, S, D]`` with one scale per channel over the whole sequence: ``(values, descale [B, H, D])``."""
    multiplier, descale = power_of_two_scale(x.abs().amax(dim=2))
    return round_fp8(x.float() * multiplier[:, :, None, :]), descale


def fp8_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float,
                            *, chunk_rows: int = 1024) -> torch.Tensor:
    """Block-sparse attention with q, k, v and P rounded as an FP8 kernel rounds them (module docstring).

    Inputs ``[B, H, S, D]`` in the mask's order, any float dtype; the rest runs in float64
    so that rounding to float8 is the only error. Returns ``[B, Hq, Sq, D]`` in ``q.dtype``;
    a row with no kept block is zero. This is the low-precision reference the conformance
    kit judges an FP8 backend against, and what the quality evaluator reports for FP8 on
    a device without an FP8 kernel.
    """
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    q8, q_descale = quantize_rows(q, Q_ROWS)
    k8, k_descale = quantize_rows(k, block_mask.block_size)
    v8, v_descale = quantize_channels(v)
    # -- unscaled operands back in float64: q and k per group of rows, v per channel
    q64 = q8.double() * q_descale.double().repeat_interleave(Q_ROWS, dim=2)[:, :, :q_len, None]
    k_rows = min(block_mask.block_size, kv_len)  # as quantize_rows groups them
    k64 = k8.double() * k_descale.double().repeat_interleave(k_rows, dim=2)[:, :, :kv_len, None]
    k64 = k64.repeat_interleave(group, dim=1)
    v8 = v8.double().repeat_interleave(group, dim=1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, q_len, chunk_rows):
        stop = min(q_len, start + chunk_rows)
        scores = (q64[:, :, start:stop] @ k64.transpose(-1, -2)) * scale
        keep = block_mask.token_mask(start, stop)
        scores = scores.masked_fill(~keep, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        probs = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, 0.0))  # 0 where not kept
        total = probs.sum(dim=-1, keepdim=True)
        rounded = round_fp8((probs * P_MULTIPLIER).float()).double()
        acc = rounded @ v8
        rows = acc * v_descale.double().repeat_interleave(group, dim=1)[:, :, None, :] / P_MULTIPLIER
        out[:, :, start:stop] = torch.where(total > 0, rows / torch.where(total > 0, total, 1.0), 0.0).to(q.dtype)
    return out


#: the recipe's low-precision reference, as ``precision.Precision.reference`` finds it
reference_attention = fp8_reference_attention
