"""Triton gather of token rows into permuted order.

``torch.index_select`` along the sequence of a ``[B, H, S, D]`` view moves
about 1.1 TB/s on an H100; this kernel copies whole rows with wide loads
and writes contiguous ``[B, H, S, D]`` outputs that TMA descriptors can read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROWS = 64  # tokens per program


@triton.jit
def gather_rows_kernel(
    X, ORDER, Out,
    stride_xb, stride_xh, stride_xs, stride_xd,
    heads, length,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    """``Out[b, h, i] = X[b, h, ORDER[i]]`` for ROWS tokens ``i`` of one (batch, head)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs = pid_s * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]
    ok = (offs < length)[:, None] & d_ok
    rows = tl.load(ORDER + offs, mask=offs < length, other=0)  # int64: rows * stride may pass 2**31
    base = X + (pid_bh // heads).to(tl.int64) * stride_xb + (pid_bh % heads).to(tl.int64) * stride_xh
    tile = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd, mask=ok, other=0.0)
    out = Out + pid_bh.to(tl.int64) * length * HEAD_DIM
    tl.store(out + offs[:, None] * HEAD_DIM + offs_d[None, :], tile, mask=ok)


def gather_rows(order: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous ``x.index_select(2, order)`` of each ``[B, H, S, D]`` tensor (any strides)."""
    return [gather_rows_into(order, x, torch.empty(x.shape, dtype=x.dtype, device=x.device)) for x in tensors]


def gather_rows_into(order: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``x.index_select(2, order)`` into ``out`` and return it: ``out`` is a contiguous
    tensor of ``x``'s shape and dtype."""
    batch, heads, length, head_dim = x.shape
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {list(x.shape)}, "
                         f"got {out.dtype} {list(out.shape)}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    if order.shape != (length,):
        raise ValueError(f"order: expected shape [{length}], got {list(order.shape)}")
    gather_rows_kernel[(triton.cdiv(length, _ROWS), batch * heads)](
        x, order, out, *x.stride(), heads, length,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), ROWS=_ROWS, num_warps=4,
    )
    return out


@triton.jit
def gather_tiles_kernel(
    X, ORDER, Out, TILE_ROWS,
    stride_xb, stride_xh, stride_xs, stride_xd,
    heads, length,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr,
):
    """One ``TILE``-row tile of one (batch, head): copied as ``gather_rows_kernel`` copies rows, unless
    every aligned ``GROUP`` of its rows is consecutive in ``X`` (or wholly past ``length``), in which case
    nothing is copied. Programs of the first (batch, head) write ``TILE_ROWS``: per group of such a tile the
    row of ``X`` it starts at (``length`` past the end), ``-1`` for every group of a copied tile."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    GROUPS: tl.constexpr = TILE // GROUP
    offs = pid_t * TILE + tl.arange(0, TILE)
    valid = offs < length
    rows = tl.load(ORDER + offs, mask=valid, other=0)
    # -- a group is in order when every row minus its place in the group gives one value (-1: past the end)
    first = tl.reshape(tl.where(valid, rows - (offs % GROUP), -1), (GROUPS, GROUP))
    low, high = tl.min(first, 1), tl.max(first, 1)
    in_order = tl.min((low == high).to(tl.int32), 0) == 1
    if pid_bh == 0:
        starts = tl.where(in_order, tl.where(low < 0, length, low), -1).to(tl.int32)
        tl.store(TILE_ROWS + pid_t * GROUPS + tl.arange(0, GROUPS), starts)
    # -- a tile not in order is copied
    offs_d = tl.arange(0, BLOCK_D)
    ok = (valid & (not in_order))[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = X + (pid_bh // heads).to(tl.int64) * stride_xb + (pid_bh % heads).to(tl.int64) * stride_xh
    tile = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd, mask=ok, other=0.0)
    out = Out + pid_bh.to(tl.int64) * length * HEAD_DIM
    tl.store(out + offs[:, None] * HEAD_DIM + offs_d[None, :], tile, mask=ok)


def gather_tiles_into(order: torch.Tensor, x: torch.Tensor, out: torch.Tensor, tile_rows: torch.Tensor,
                      tile: int, group: int) -> None:
    """``gather_rows_into`` for a kernel that reads ``x`` itself, ``group`` rows at a time, where it can.

    Per ``tile``-row tile of ``order``: when every aligned ``group`` of its rows is consecutive in ``x``'s
    order (or past the end), nothing is copied and ``tile_rows`` (int32, ``tile // group`` entries per
    tile of ``order``) says where in ``x`` each group starts; otherwise the tile's rows are copied into
    ``out`` (contiguous, ``x``'s shape) as ``gather_rows_into`` copies them and its entries are ``-1``.
    No host synchronisation: the choice is made on the device.
    """
    batch, heads, length, head_dim = x.shape
    tiles = triton.cdiv(length, tile)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {x.dtype} tensor of shape {list(x.shape)}, "
                         f"got {out.dtype} {list(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    if order.shape != (length,):
        raise ValueError(f"order: expected shape [{length}], got {list(order.shape)}")
    if tile_rows.dtype != torch.int32 or tile_rows.shape != (tiles * (tile // group),):
        raise ValueError(f"tile_rows: expected an int32 tensor of shape [{tiles * (tile // group)}], "
                         f"got {tile_rows.dtype} {list(tile_rows.shape)}")
    gather_tiles_kernel[(tiles, batch * heads)](
        x, order, out, tile_rows, *x.stride(), heads, length,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), TILE=tile, GROUP=group, num_warps=4,
    )
