"""Triton block-sparse flash-attention forward kernel and its tuned configurations.

Imported only when the ``triton`` backend runs (never at ``import rainfusion_core``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters; BLOCK_M and BLOCK_N must divide the mask block size."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Per (head dim bucket, dtype class). (128, "half") was chosen by the sweep of
# benchmarks/triton_bench.py on an H100 (docs/benchmarks-history.md lists what was tried); the
# other entries are untuned starting points sized to fit Hopper's shared memory.
# None depends on sequence length or density, so a new shape never triggers re-tuning.
_CONFIGS = {
    (64, "half"): KernelConfig(128, 128, 8, 3),
    (128, "half"): KernelConfig(128, 128, 8, 2),
    (256, "half"): KernelConfig(64, 64, 4, 2),
    (64, "fp32"): KernelConfig(64, 64, 4, 2),
    (128, "fp32"): KernelConfig(64, 32, 4, 2),
    (256, "fp32"): KernelConfig(32, 32, 4, 1),
}


# When k and v are read through the permutation (GATHER_KV), the chain of loads (kept block ->
# token rows -> tile) needs one more pipeline stage to stay ahead: 3 stages measured 4.19 ms
# against 6.74 ms with 2 at the Wan2.1-1.3B shape (docs/benchmarks-history.md).
_GATHER_CONFIGS = {
    (128, "half"): KernelConfig(128, 128, 8, 3),
}


def pick_config(head_dim: int, dtype: torch.dtype, mask_block: int, *, gather_kv: bool = False) -> KernelConfig:
    """The tuned configuration for this head dim and dtype, shrunk to divide ``mask_block``."""
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    key = (bucket, "fp32" if dtype == torch.float32 else "half")
    config = _GATHER_CONFIGS.get(key, _CONFIGS[key]) if gather_kv else _CONFIGS[key]
    block_m, block_n = config.block_m, config.block_n
    while mask_block % block_m:
        block_m //= 2
    while mask_block % block_n:
        block_n //= 2
    return KernelConfig(block_m, block_n, config.num_warps, config.num_stages)


@triton.jit
def _load_tile(base, desc, coords, offs_rows, rows_ok, stride_rows, offs_d, stride_d,
               HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, USE_TMA: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A ``[BLOCK_ROWS, BLOCK_D]`` tile: through a TMA descriptor (bounds zero-filled by hardware) or pointers."""
    if USE_TMA:
        tile = desc.load(coords).reshape(BLOCK_ROWS, HEAD_DIM)
    else:
        ptrs = base + offs_rows[:, None] * stride_rows + offs_d[None, :] * stride_d
        ok = (offs_d < HEAD_DIM)[None, :]
        if CHECK_ROWS:
            ok = ok & rows_ok[:, None]
        tile = tl.load(ptrs, mask=ok, other=0.0)
    return tile


@triton.jit
def _token_rows(order, offs, ok, GATHER: tl.constexpr, CHECK: tl.constexpr):
    """Rows of the tensor in memory for permuted positions ``offs``: ``order[offs]`` when GATHER."""
    if GATHER:
        if CHECK:
            rows = tl.load(order + offs, mask=ok, other=0).to(tl.int32)
        else:
            rows = tl.load(order + offs).to(tl.int32)
    else:
        rows = offs
    return rows


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, kept, first, last, max_block, k_base, v_base, desc_k, desc_v, order, b, kv_h,
    stride_ks, stride_kd, stride_vs, stride_vd, kv_len, qk_scale,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, GATHER_KV: tl.constexpr, RAGGED: tl.constexpr,
):
    """Online softmax over kept key tiles ``first .. last - 1``; only RAGGED tiles check ``kv_len``.

    Every block index read from the mask is clamped to ``[0, max_block]``, so even a mask edited
    after its checks never moves a load outside k and v.
    """
    TILES: tl.constexpr = MASK_BLOCK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # -- one flat loop over the kept tiles, so the pipeliner can prefetch across blocks
    for t in range(first, last):
        block = tl.minimum(tl.maximum(tl.load(kept + t // TILES), 0), max_block)
        start = block * MASK_BLOCK + (t % TILES) * BLOCK_N
        start = tl.multiple_of(start, BLOCK_N)
        offs_k = start + offs_n
        k_ok = offs_k < kv_len
        rows = _token_rows(order, offs_k, k_ok, GATHER_KV, RAGGED)
        k = _load_tile(k_base, desc_k, [b, kv_h, start, 0], rows, k_ok, stride_ks, offs_d, stride_kd,
                       HEAD_DIM, BLOCK_N, USE_TMA, RAGGED)
        # -- scores in base 2 (scale folded into one FMA); keys past the sequence end never win
        qk = tl.dot(q, k.T, input_precision=INPUT_PRECISION)
        if RAGGED:
            qk = tl.where(k_ok[None, :], qk, float("-inf"))
        # -- online softmax: new running max, rescale what was accumulated
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # -- accumulate P V
        v = _load_tile(v_base, desc_v, [b, kv_h, start, 0], rows, k_ok, stride_vs, offs_d, stride_vd,
                       HEAD_DIM, BLOCK_N, USE_TMA, RAGGED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def block_sparse_attention_fwd(
    Q, K, V, Out, KV_COUNTS, KV_INDICES, ORDER, LSE,
    desc_q, desc_k, desc_v, desc_o,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh,
    q_heads, q_len, kv_len, mask_rows, mask_cols, qk_scale,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TMA_Q: tl.constexpr,
    TMA_KV: tl.constexpr,
    GATHER_Q: tl.constexpr,
    GATHER_KV: tl.constexpr,
    WRITE_LSE: tl.constexpr = False,
):
    """One program: BLOCK_M query rows of one (batch, head), over the kept key blocks of their mask row.

    ``qk_scale`` is ``scale * log2(e)``: the softmax runs in base 2 with ``exp2``. With TMA_Q
    (q and out) and TMA_KV (k and v) the tiles move through the ``desc_*`` tensor descriptors of
    the 4-D ``[B, H, S, D]`` views (Hopper and newer); otherwise through pointers and strides.

    The mask and the loop run in permuted order. With GATHER_Q, permuted query row ``i`` is
    row ``ORDER[i]`` of Q and is written to row ``ORDER[i]`` of Out (the tensors stay in the
    model's order, no permuted copies); GATHER_KV does the same for the rows of K and V.
    With WRITE_LSE each row's natural log-sum-exp (``-inf`` for a row with no kept key) goes to
    ``LSE [B, H, S]`` (unit stride along S), at the row its output goes to.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    kv_h = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len

    # -- the query tile stays in registers for the whole loop
    b64 = b.to(tl.int64)  # batch offsets of large tensors overflow int32
    q_base = Q + b64 * stride_qb + h * stride_qh
    rows_m = _token_rows(ORDER, offs_m, m_ok, GATHER_Q, True)
    q = _load_tile(q_base, desc_q, [b, h, pid_m * BLOCK_M, 0], rows_m, m_ok, stride_qs, offs_d, stride_qd,
                   HEAD_DIM, BLOCK_M, TMA_Q, True)

    # -- this tile's mask row: how many key blocks, and which (count clamped to the row's length)
    mask_row = (b * q_heads + h) * mask_rows + (pid_m * BLOCK_M) // MASK_BLOCK
    count = tl.minimum(tl.maximum(tl.load(KV_COUNTS + mask_row), 0), mask_cols)
    kept = KV_INDICES + mask_row.to(tl.int64) * mask_cols
    # The ragged last key block, if kept, is the last entry (indices ascend): only it needs bounds checks.
    # The unchecked loop runs over whole blocks only: at most kv_len // MASK_BLOCK of them, each clamped
    # below that bound, so no index a mask holds can make it read past kv_len.
    last_block = tl.load(kept + tl.maximum(count - 1, 0))
    ragged = (count > 0) & (last_block == mask_cols - 1) & (kv_len % MASK_BLOCK != 0)
    full_blocks = kv_len // MASK_BLOCK
    even = tl.minimum(count - ragged.to(tl.int32), full_blocks)

    k_base = K + b64 * stride_kb + kv_h * stride_kh
    v_base = V + b64 * stride_vb + kv_h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    TILES: tl.constexpr = MASK_BLOCK // BLOCK_N
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, kept, 0, even * TILES, full_blocks - 1, k_base, v_base, desc_k, desc_v, ORDER, b, kv_h,
        stride_ks, stride_kd, stride_vs, stride_vd, kv_len, qk_scale,
        HEAD_DIM, MASK_BLOCK, BLOCK_N, BLOCK_D, INPUT_PRECISION, TMA_KV, GATHER_KV, RAGGED=False,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, kept, even * TILES, count * TILES, mask_cols - 1, k_base, v_base, desc_k, desc_v,
        ORDER, b, kv_h,
        stride_ks, stride_kd, stride_vs, stride_vd, kv_len, qk_scale,
        HEAD_DIM, MASK_BLOCK, BLOCK_N, BLOCK_D, INPUT_PRECISION, TMA_KV, GATHER_KV, RAGGED=True,
    )

    # -- epilogue: normalise; a row with no kept block stays zero
    if WRITE_LSE:  # m_i and l_i are in base 2: ln(sum) = (m + log2 l) * ln 2
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(LSE + b64 * stride_lb + h * stride_lh + rows_m, lse, mask=m_ok)
    acc = (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(Out.dtype.element_ty)
    if TMA_Q:
        desc_o.store([b, h, pid_m * BLOCK_M, 0], acc.reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = Out + b64 * stride_ob + h * stride_oh + rows_m[:, None] * stride_os + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc, mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
