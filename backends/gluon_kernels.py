"""Hopper block-sparse attention forward in Gluon: explicit async wgmma overlapping softmax and P·V.

Imported only when the ``triton`` backend runs on an sm_90 GPU with 128-token
blocks, head dim 128 and 16-bit inputs; every other case uses the Triton kernel
of :mod:`triton_kernels`. What Triton's compiler does not do for us, this kernel
does by hand (as FlashAttention-3 does): while the tensor cores compute ``P_{t-1} V_{t-1}``,
the warps run the softmax of tile ``t``, whose ``Q K_t^T`` was issued before it.

Inputs: q in the model's order, read through ``ORDER`` (pointers); k and v as
contiguous copies in permuted order, read by TMA into a two-slot ring per
tensor; the output is written back through ``ORDER``.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK = 128  # query rows per program = key rows per tile = mask block = head dim
NUM_WARPS = 8  # two warpgroups of 64 query rows each


@gluon.jit
def _issue(desc, bars, smem, kept, t, n, row0, TILES: gl.constexpr, MASK_BLOCK: gl.constexpr,
           BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA copy of kept key tile ``t`` (if ``t < n``) into slot ``t % STAGES``."""
    live = t < n
    tt = gl.minimum(t, n - 1)
    start = gl.load(kept + tt // TILES) * MASK_BLOCK + (tt % TILES) * BLOCK_N
    slot = t % STAGES
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=live)
    tma.async_copy_global_to_shared(desc, [row0 + start, 0], bars.index(slot), smem.index(slot), pred=live)


@gluon.jit
def _tile_start(kept, t, TILES: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):
    return gl.load(kept + t // TILES) * MASK_BLOCK + (t % TILES) * BLOCK_N


@gluon.jit
def _softmax(s, m_i, l_i, start, kv_len, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online softmax step on one score tile: new max, probabilities, rescale factor, new sum."""
    if start + BLOCK_N > kv_len:  # the ragged last block: keys past the end never win
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < kv_len)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def block_sparse_attention_fwd_sm90(
    Q, Out, desc_k, desc_v, KV_COUNTS, KV_INDICES, ORDER,
    stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os,
    q_heads, kv_heads, q_len, kv_len, mask_rows, mask_cols, qk_scale,
    HEAD_DIM: gl.constexpr, GROUP: gl.constexpr, MASK_BLOCK: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
):
    """One program: BLOCK_M permuted query rows of one (batch, head) over the kept key tiles of their mask row."""
    TILES: gl.constexpr = MASK_BLOCK // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    dtype: gl.constexpr = desc_k.dtype

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    b64 = b.to(gl.int64)

    # -- the query tile, gathered through the permutation, parked in shared memory for wgmma
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    m_ok = offs_m < q_len
    rows = gl.load(ORDER + offs_m, mask=m_ok, other=0).to(gl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :]
    q = gl.load(q_ptrs, mask=m_ok[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype), q)

    # -- two-slot rings for k and v tiles, one mbarrier per slot
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    # -- this tile's mask row
    mask_row = (b * q_heads + h) * mask_rows + (pid_m * BLOCK_M) // MASK_BLOCK
    n = gl.load(KV_COUNTS + mask_row) * TILES
    kept = KV_INDICES + mask_row.to(gl.int64) * mask_cols
    row0 = (b * kv_heads + h // GROUP) * kv_len

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    s = zero_s

    if n > 0:
        _issue(desc_k, k_bars, k_smem, kept, 0, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
        _issue(desc_k, k_bars, k_smem, kept, 1, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
        _issue(desc_v, v_bars, v_smem, kept, 0, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok])
    if n == 1:
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_start(kept, 0, TILES, MASK_BLOCK, BLOCK_N), kv_len,
                                      qk_scale, s_layout, BLOCK_N)
        mbarrier.wait(v_bars.index(0), 0)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(0), acc)
    elif n > 1:
        # -- tile 0: issue S_1, softmax of S_0 under it, then P_0 V_0
        mbarrier.wait(k_bars.index(1), 0)
        s_tok = warpgroup_mma(q_smem, k_smem.index(1).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_start(kept, 0, TILES, MASK_BLOCK, BLOCK_N), kv_len,
                                      qk_scale, s_layout, BLOCK_N)
        gl.thread_barrier()
        _issue(desc_k, k_bars, k_smem, kept, 2, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
        _issue(desc_v, v_bars, v_smem, kept, 1, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
        mbarrier.wait(v_bars.index(0), 0)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        o_tok = warpgroup_mma(p_op, v_smem.index(0), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])

        for t in range(1, n - 1):
            # -- S_t is ready and P_{t-1} V_{t-1} is in flight: issue S_{t+1}, softmax of S_t under both
            nxt = (t + 1) % STAGES
            mbarrier.wait(k_bars.index(nxt), ((t + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_start(kept, t, TILES, MASK_BLOCK, BLOCK_N), kv_len,
                                          qk_scale, s_layout, BLOCK_N)
            # -- P_{t-1} V_{t-1} (older than S_{t+1}) has landed: rescale, refill the freed slots
            acc = warpgroup_mma_wait(1, deps=[o_tok])
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            gl.thread_barrier()
            _issue(desc_k, k_bars, k_smem, kept, t + 2, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
            _issue(desc_v, v_bars, v_smem, kept, t + 1, n, row0, TILES, MASK_BLOCK, BLOCK_N, STAGES)
            # -- P_t V_t; then wait for S_{t+1} only
            cur = t % STAGES
            mbarrier.wait(v_bars.index(cur), (t // STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            o_tok = warpgroup_mma(p_op, v_smem.index(cur), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_tok])

        # -- the last tile
        last = n - 1
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, _tile_start(kept, last, TILES, MASK_BLOCK, BLOCK_N), kv_len,
                                      qk_scale, s_layout, BLOCK_N)
        acc = warpgroup_mma_wait(0, deps=[o_tok])
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), acc)

    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    # -- epilogue: normalise; a row with no kept block stays zero; scatter back through ORDER
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    out = (acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]).to(dtype)
    out = gl.convert_layout(out, ld_layout)
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :]
    gl.store(o_ptrs, out, mask=m_ok[:, None])


def supported(q: torch.Tensor, mask_block: int) -> bool:
    """Whether this kernel covers the call: sm_90, 16-bit, head dim 128, 128-token mask blocks, unit d-stride."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == BLOCK and mask_block == BLOCK
            and q.stride(-1) == 1)


def launch(q, k_perm, v_perm, out, kv_counts, kv_indices, order, scale: float) -> None:
    """Run the kernel: q/out ``[B, H, S, D]`` views in model order, k/v contiguous permuted ``[B, Hkv, S, D]``."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k_perm.shape[1], k_perm.shape[2]
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, head_dim], dtype)
    desc_k, desc_v = (TensorDescriptor.from_tensor(x.view(-1, head_dim), [BLOCK, head_dim], layout)
                      for x in (k_perm, v_perm))
    grid = (triton_cdiv(q_len, BLOCK), batch * heads)
    block_sparse_attention_fwd_sm90[grid](
        q, out, desc_k, desc_v, kv_counts, kv_indices, order,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, kv_heads, q_len, kv_len, kv_counts.shape[-1], kv_indices.shape[-1], scale * 1.4426950408889634,
        HEAD_DIM=head_dim, GROUP=heads // kv_heads, MASK_BLOCK=BLOCK, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        STAGES=2, WARPS=NUM_WARPS, num_warps=NUM_WARPS,
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
