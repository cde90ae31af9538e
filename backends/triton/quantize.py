"""Triton pass that prepares k and v for the FP8 Hopper kernel (``rainfusion_core.fp8``'s recipe).

One program per (mask block of keys, batch x kv head) reads its rows through the
permutation and writes

* ``k8 [B, Hkv, S, D]`` float8 e4m3 with one power-of-two scale per block (``k_descale [B, Hkv, NB]``);
* ``v8t [B, Hkv, D, S_pad]`` float8 e4m3, *transposed*: the FP8 tensor-core product
  ``P V`` needs v with the keys contiguous; one scale per channel (``v_descale [B, Hkv, D]``),
  from the channel's largest magnitude over the whole sequence, taken before this pass.
  Within each chunk of 32 keys the columns are reordered (:func:`key_slots`): column ``k``
  holds the key whose probability sits in the A-operand register the tensor cores read for
  ``k``, so the kernel feeds P to ``P V`` straight from the softmax's registers.

``S_pad`` rounds the sequence up to 32 (whole chunks; every row of ``v8t`` 16-byte aligned for
TMA); the columns of keys past ``S`` hold zeros, and the kernel's descriptor ends at ``S_pad``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rainfusion_core.fp8 import FP8_DTYPE, MIN_AMAX, TOP_EXPONENT, power_of_two_scale


@triton.jit
def power_of_two_scale_kernel(amax, TOP: tl.constexpr, MIN: tl.constexpr):
    """``(multiplier, descale)``: ``2 ** (TOP - floor(log2 amax))`` and its inverse, exact, from the bits."""
    bits = tl.maximum(amax, MIN).to(tl.int32, bitcast=True)
    top = ((bits >> 23) & 0xFF) - 127  # floor(log2 amax) of a normal float32
    multiplier = ((127 + TOP - top) << 23).to(tl.float32, bitcast=True)
    descale = ((127 - TOP + top) << 23).to(tl.float32, bitcast=True)
    return multiplier, descale


@triton.jit
def round_to_e4m3(x):
    """``x`` (float32, ``|x| < 448``) rounded to the nearest float8 e4m3 value, ties to even, still float32.

    The hardware conversion rounds the same way; rounding first makes the conversion that
    follows exact everywhere, the Triton CPU interpreter included (its own conversion rounds
    differently), so CI checks this pass bit for bit against the reference.
    """
    bits = x.to(tl.int32, bitcast=True)
    # normal e4m3 (|x| >= 2**-6): keep 3 of float32's 23 mantissa bits, ties to even
    kept = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = kept.to(tl.float32, bitcast=True)
    # subnormal e4m3 (|x| < 2**-6): multiples of 2**-9, by the round-to-nearest-even float addition
    subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


# Within a 32-key chunk, bit ``4 - i`` of a key's column in ``v8t`` is bit ``KEY_BITS[i]`` of its place in the
# chunk (key_slots): the FP8 kernel's P, reshaped into the five key bits and permuted into this order
# (``hopper/attention.py``, ``_p_operand``), then sits where the 8-bit A operand of P V wants it.
KEY_BITS = (4, 2, 1, 3, 0)
CHUNK = 32


@triton.jit
def slot_key(column):
    """The key that column ``column`` of ``v8t`` holds (the inverse of :func:`key_slots`, ``KEY_BITS``):
    bits 3, 2, 1 of the column's place in its 32-key chunk are bits 1, 3, 2 of the key's."""
    r = column & 31
    return (column - r) + (r & 0x11) + (((r >> 1) & 1) << 3) + (((r >> 3) & 1) << 2) + (((r >> 2) & 1) << 1)


@triton.jit
def quantize_kv_kernel(
    K, V, ORDER, K8, V8T, K_DESCALE, V_MULT,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    heads, length, n_blocks, v8t_row,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TOP: tl.constexpr, MIN: tl.constexpr,
):
    """One program: permuted key rows ``[BLOCK * pid, BLOCK * (pid + 1))`` of one (batch, kv head)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs < length
    rows = tl.load(ORDER + offs, mask=ok, other=0).to(tl.int64)

    # -- k: one power-of-two scale for the block
    k = tl.load(K + b64 * stride_kb + h * stride_kh + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=ok[:, None], other=0.0).to(tl.float32)
    multiplier, descale = power_of_two_scale_kernel(tl.max(tl.max(tl.abs(k), 1), 0), TOP, MIN)
    k8 = K8 + pid_bh.to(tl.int64) * length * HEAD_DIM
    tl.store(k8 + offs[:, None] * HEAD_DIM + offs_d[None, :], round_to_e4m3(k * multiplier).to(K8.dtype.element_ty),
             mask=ok[:, None])
    tl.store(K_DESCALE + pid_bh * n_blocks + pid_n, descale)

    # -- v: the channel multipliers of this (batch, head), written transposed (keys contiguous). Each column
    #    of the block is loaded from the key it holds, so the columns are stored in order: the stores coalesce
    keys = pid_n * BLOCK + slot_key(tl.arange(0, BLOCK))
    keys_ok = keys < length
    v_rows = tl.load(ORDER + keys, mask=keys_ok, other=0).to(tl.int64)
    vt = tl.load(V + b64 * stride_vb + h * stride_vh + v_rows[None, :] * stride_vs + offs_d[:, None] * stride_vd,
                 mask=keys_ok[None, :], other=0.0).to(tl.float32)
    v_mult = tl.load(V_MULT + pid_bh * HEAD_DIM + offs_d)
    v8t = V8T + pid_bh.to(tl.int64) * HEAD_DIM * v8t_row
    # keys past the sequence, up to the end of their 32-key chunk, are written as zeros (their probability is 0)
    tl.store(v8t + offs_d[:, None] * v8t_row + offs[None, :],
             round_to_e4m3(vt * v_mult[:, None]).to(V8T.dtype.element_ty), mask=(offs < v8t_row)[None, :])


def padded_length(length: int) -> int:
    """Row length of ``v8t``: ``length`` rounded up to whole 32-key chunks."""
    return -(-length // CHUNK) * CHUNK


def key_slots(length: int, device=None) -> torch.Tensor:
    """For each key ``0 .. length - 1``, the column of ``v8t`` that holds it: ``v8t[..., key_slots(S)]`` is v
    (scaled, float8) transposed, in key order.

    Within a 32-key chunk key ``c`` goes to column ``k`` with ``k``'s bits 4..0 = ``c``'s bits 4, 2, 1, 3, 0:
    the order in which the FP8 kernel's softmax holds the probabilities in the registers that the 8-bit
    tensor-core product reads as its A operand (``hopper/attention.py``, ``_p_operand``)."""
    c = torch.arange(length, device=device)
    r = c % CHUNK
    return (c - r) + sum(((r >> bit) & 1) << (4 - i) for i, bit in enumerate(KEY_BITS))


def quantize_kv(k: torch.Tensor, v: torch.Tensor, order: torch.Tensor, block: int):
    """``(k8, k_descale, v8t, v_descale)`` of ``k, v [B, Hkv, S, D]`` (any strides) read through ``order``.

    No host synchronisation: the channel maxima of v are one device reduction.
    """
    if block % CHUNK:  # the last block's program writes the zeros up to the end of its chunk
        raise ValueError(f"quantize_kv: block must be a multiple of {CHUNK}, got {block}")
    batch, heads, length, head_dim = k.shape
    n_blocks = -(-length // block)
    row = padded_length(length)
    k8 = torch.empty((batch, heads, length, head_dim), dtype=FP8_DTYPE, device=k.device)
    v8t = torch.empty((batch, heads, head_dim, row), dtype=FP8_DTYPE, device=k.device)
    k_descale = torch.empty((batch, heads, n_blocks), dtype=torch.float32, device=k.device)
    # the largest magnitude of each channel, in one pass without a copy of |v|
    amax = torch.linalg.vector_norm(v, float("inf"), dim=2).float()
    v_mult, v_descale = power_of_two_scale(amax)
    quantize_kv_kernel[(n_blocks, batch * heads)](
        k, v, order, k8, v8t, k_descale, v_mult.contiguous(),
        *k.stride(), *v.stride(), heads, length, n_blocks, row,
        HEAD_DIM=head_dim, BLOCK=block, TOP=TOP_EXPONENT, MIN=MIN_AMAX, num_warps=4,
    )
    return k8, k_descale, v8t, v_descale.contiguous()
