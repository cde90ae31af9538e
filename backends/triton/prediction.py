"""Triton kernels for the two heavy steps of RainFusion2.0 mask prediction.

``block_means``: one pass over q or k (read through the permutation, so no
permuted copy exists) giving float32 block means. ``select_blocks``: one
program per tile of mask rows doing the softmax, the exact ``keep``-th
largest probability (bisection on its bits), the forced sink and text
blocks, and both mask views. Imported only when the ``triton`` backend
predicts a mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tuned on the H100 (docs/benchmarks-history.md, head dim 64 and 128): block means read a whole 128-token block in
# one step (q and k at CogVideoX-5B: 0.104 ms, against 0.154 ms 32 tokens at a time); select_blocks
# takes a tile of at most 512 scores per program, one warp per 512 (0.027 ms against 0.053 ms).
_ROWS = 128  # tokens summed per step of the block-means loop
_WARPS = 4
_SELECT_TILE = 512  # scores per select_blocks program (one row at least)


@triton.jit
def block_means_kernel(
    X, ORDER, Out,
    stride_xb, stride_xh, stride_xs, stride_xd,
    heads, length, n_blocks,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, GATHER: tl.constexpr,
):
    """One program: the mean of permuted tokens ``[BLOCK * pid, BLOCK * (pid + 1))`` of one (batch, head)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    base = X + (pid_bh // heads).to(tl.int64) * stride_xb + (pid_bh % heads) * stride_xh
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    # -- sum the block ROWS tokens at a time, rows read through the permutation
    for start in range(0, BLOCK, ROWS):
        offs = pid_n * BLOCK + start + tl.arange(0, ROWS)
        ok = (offs < length) & (start + tl.arange(0, ROWS) < BLOCK)
        if GATHER:
            rows = tl.load(ORDER + offs, mask=ok, other=0).to(tl.int32)
        else:
            rows = offs
        x = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd,
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
    # -- the last block may be partial: divide by the tokens it has
    count = tl.minimum(length - pid_n * BLOCK, BLOCK)
    tl.store(Out + (pid_bh * n_blocks + pid_n) * HEAD_DIM + offs_d, total / count, mask=d_ok)


@triton.jit
def select_blocks_kernel(
    SCORES, DENSE, COUNTS, INDICES,
    total_rows, n_rows, n_cols, keep, scale, sink_blocks, text_blocks,
    ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """One program: ROWS mask rows (of the ``B * H * NQ``), each from its ``n_cols`` pooled scores."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, COLS)
    ok = (rows < total_rows)[:, None] & (offs < n_cols)[None, :]
    at = rows.to(tl.int64)[:, None] * n_cols + offs[None, :]
    # -- softmax of the scaled scores, as torch.softmax computes it
    raw = tl.load(SCORES + at, mask=ok, other=0.0) * scale
    # a row with a NaN or infinite score (NaN or infinite q or k) keeps every block, as in selection.py
    poisoned = tl.sum((ok & ((raw != raw) | (tl.abs(raw) == float("inf")))).to(tl.int32), 1) > 0
    x = tl.where(ok, raw, float("-inf"))
    row_max = tl.max(x, 1)
    e = tl.where(ok, tl.exp(x - tl.where(rows < total_rows, row_max, 0.0)[:, None]), 0.0)
    p = e / tl.maximum(tl.sum(e, 1), 1e-30)[:, None]  # padding rows (past total_rows) stay 0
    # -- the keep-th largest probability, exactly: probabilities are >= 0, so their bit patterns
    #    order like their values; bisect for the largest pattern t with count(bits >= t) >= keep
    bits = tl.where(ok, p.to(tl.int32, bitcast=True), -1)
    lo = tl.zeros([ROWS], dtype=tl.int32)
    hi = tl.full([ROWS], 0x7F800000, dtype=tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((bits >= mid[:, None]).to(tl.int32), 1) >= keep
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    kept = (bits >= lo[:, None]) | poisoned[:, None]  # ties with the keep-th kept too
    # -- forced blocks: the first-frame sink and the text, as whole rows and whole columns
    i = rows % n_rows
    forced_row = (i < sink_blocks) | (i >= n_rows - text_blocks)
    forced_col = (offs < sink_blocks) | (offs >= n_cols - text_blocks)
    kept = (kept | forced_col[None, :] | forced_row[:, None]) & ok
    # -- both views: kept blocks left-packed in ascending order, then the skipped ones
    kept_i = kept.to(tl.int32)
    count = tl.sum(kept_i, 1)
    slot = tl.where(kept, tl.cumsum(kept_i, 1) - 1, count[:, None] + tl.cumsum(1 - kept_i, 1) - 1)
    tl.store(DENSE + at, kept.to(tl.int8), mask=ok)
    tl.store(INDICES + rows.to(tl.int64)[:, None] * n_cols + slot, tl.broadcast_to(offs[None, :], [ROWS, COLS]), mask=ok)
    tl.store(COUNTS + rows, count, mask=rows < total_rows)


def block_means(x: torch.Tensor, block_size: int, order: torch.Tensor | None) -> torch.Tensor:
    """float32 ``[B, H, NB, D]`` means of ``x [B, H, S, D]`` read in ``order`` (see Backend.block_means)."""
    batch, heads, length, head_dim = x.shape
    n_blocks = triton.cdiv(length, block_size)
    out = torch.empty((batch, heads, n_blocks, head_dim), dtype=torch.float32, device=x.device)
    block = block_size if n_blocks > 1 else length  # one block: the same mean, and work follows S
    block_means_kernel[(n_blocks, batch * heads)](
        x, x if order is None else order, out, *x.stride(), heads, length, n_blocks,
        HEAD_DIM=head_dim, BLOCK=block, BLOCK_D=triton.next_power_of_2(head_dim),
        ROWS=min(_ROWS, triton.next_power_of_2(block)),
        GATHER=order is not None, num_warps=_WARPS,
    )
    return out


def select_blocks(scores: torch.Tensor, *, scale: float, keep: int, sink_blocks: int, text_blocks: int):
    """``(dense, kv_counts, kv_indices)`` of ``scores [B, H, NQ, NK]`` (see ``selection.select_blocks``)."""
    scores = scores.contiguous()
    batch, heads, n_rows, n_cols = scores.shape
    dense = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    counts = torch.empty((batch, heads, n_rows), dtype=torch.int32, device=scores.device)
    indices = torch.empty(scores.shape, dtype=torch.int32, device=scores.device)
    cols = triton.next_power_of_2(n_cols)
    rows = max(1, min(16, _SELECT_TILE // cols))  # a [rows, cols] tile of at most _SELECT_TILE scores per program
    warps = max(1, min(4, rows * cols // 512))
    total = batch * heads * n_rows
    select_blocks_kernel[(triton.cdiv(total, rows),)](
        scores, dense, counts, indices, total, n_rows, n_cols, keep, scale, sink_blocks, text_blocks,
        ROWS=rows, COLS=cols, num_warps=warps,
    )
    return dense.view(torch.bool), counts, indices
