"""Hopper (sm_90) block-sparse attention forward in Gluon, warp-specialised as FlashAttention-3 is.

One program owns one 128-row query block (one mask row) of one (batch, head)
and runs three partitions:

* a 1-warp **loader** streams the kept k and v tiles by TMA into two-slot
  rings, each slot guarded by a *ready* and an *empty* mbarrier;
* two 4-warp **consumer** warpgroups own 64 query rows each. Per kept tile a
  consumer issues ``S_{t+1} = Q K_{t+1}^T`` and ``O += P_t V_t`` on the
  tensor cores, then runs the softmax of ``S_{t+1}`` while ``P_t V_t`` runs
  (``SCHEDULES`` says per precision and head dim how); the warp schedulers
  interleave the two consumers, so one warpgroup's softmax also runs under
  the other's GEMMs. (Forcing strict turns, FlashAttention-3's ping-pong, with
  a pair of mbarriers or with named barriers, measured no faster:
  docs/benchmarks-history.md.)

Inputs: q and out in the model's order, rows read and written through
``ORDER``; k and v in permuted order (TMA cannot gather rows on Hopper), read
through 4-D descriptors ``[B, Hkv, S, D]``, so a tile past a head's last key
gets TMA's zero fill, never the next head's rows. In FP8 (``precision="fp8"``,
``rainfusion_core.fp8``) the same program runs both products on the 8-bit tensor
cores: k is float8, v float8 and transposed (written by ``quantize.py``), q and P
are rounded in the kernel. Covers 16-bit inputs, head dims 64 and 128 (``TUNING``)
and 128-token mask blocks; :func:`unsupported_reason` says why a call is not covered.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from rainfusion_core import fp8 as recipe

from ..quantize import padded_length
from ..tma import tma_readable

# Triton 3.7+ names the TMA load ``async_load`` and keeps the old name only as an error.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK = 128  # query rows per program = key rows per tile = mask block
ROWS: gl.constexpr = gl.constexpr(64)  # query rows per consumer warpgroup
# Per head dim, with the reason (H100, docs/benchmarks-history.md):
#   128: two slots per k and v ring (2 x 32 KB each) keep the next tile's copy ahead of the MMAs;
#    64: two slots too: 3 and 4 measured no faster at the CogVideoX-5B shape (3.07 / 3.06 / 3.05 ms).
# min_tokens: below it the launcher's automatic choice keeps the portable kernel. At d=64 this
# kernel won at 17776 tokens (CogVideoX-5B, 3.06 against 4.20 ms) and lost at 6144 (LTX-Video: its
# forward 91 -> 124 ms eager, against 86 ms on the portable kernel); the crossover was not measured.
# The program shape (128 query rows in two 64-row consumer warpgroups, 128-key tiles) is the mask
# block's and the same for both. Head dim 256 does not fit it (compiled for sm_90a with
# tools/compile_hopper_kernel.py): a 2-slot ring needs 344 KB of shared memory, over the 227 KB a
# block may use, and with 1 slot (213 KB) the 64 x 256 float32 O tile spills (317 local loads and 294
# stores); d=256 runs on the portable kernel.
TUNING = {128: dict(stages=2, min_tokens=0), 64: dict(stages=2, min_tokens=16384)}
SUPPORTED_HEAD_DIMS = tuple(sorted(TUNING))
# Registers per thread: each consumer warpgroup holds S, P and O tiles of 64 x 128; the loader only
# scalars. (2 * 240 + 24) / 3 = 168 per thread on average fills the 64K-register file with 12 warps.
CONSUMER_REGS: gl.constexpr = gl.constexpr(240)
# The FP8 recipe's constants (rainfusion_core.fp8), as the kernel sees them.
TOP_EXPONENT: gl.constexpr = gl.constexpr(recipe.TOP_EXPONENT)
MIN_AMAX: gl.constexpr = gl.constexpr(recipe.MIN_AMAX)
# FP8 stores P as p * P_MULTIPLIER, a power of two: the softmax subtracts its log2 from the exponent instead.
P_SHIFT: gl.constexpr = gl.constexpr(int(math.log2(recipe.P_MULTIPLIER)))
assert 2.0 ** P_SHIFT.value == recipe.P_MULTIPLIER
# FP8: kept tiles O accumulates inside the tensor cores before it is added to its float32 total (_consumer).
# H100, Wan2.1-1.3B shape: every 4 tiles 1.00x the bf16 kernel, every 8 tiles 1.08x; the error is the
# roundings' alone at both (cosine 0.9992 against bf16), against 0.998 with no flush at 1.17x.
FLUSH_EVERY: gl.constexpr = gl.constexpr(8)
LOADER_REGS: gl.constexpr = gl.constexpr(24)
# FP8: _p_operand's permutation of P reshaped to [row, chunk, key bits 4, 3, 2, 1, 0]: v8t's key order
# (quantize.KEY_BITS). _p_operand spells it out: Triton 3.6's permute takes no constexpr list (a test
# checks the three against each other).
P_KEY_DIMS = (0, 1, 2, 4, 5, 3, 6)


# -- exponentials off the special-function unit (FlashAttention-4's idea). Per SM that unit computes 16
# exp2s a cycle: in FP8 one tile's 2 x 64 x 128 probabilities take as long there as both products on
# the tensor cores. _exp2 computes one in Schedule.poly_every of them on the FMA units instead:
# 2 ** x = 2 ** j * 2 ** f with j = round(x) (adding 1.5 * 2**23 rounds), f = x - j in [-1/2, 1/2], 2 ** f a
# degree-3 polynomial (relative error 7.5e-5, below bfloat16's rounding of P, 2**-9) and j added to
# its exponent bits. x is first raised to -125 so the result stays a normal float: a masked key
# (-inf) gets 2**-125 (about 2e-38) instead of 0, far below any kept probability's rounding; a NaN
# x (a NaN in q or k) gives NaN, as the special-function unit does.
EXP2_COEFFS = (0.9999280571937561, 0.6932609677314758, 0.2426111400127411, 0.0551716685295105)


def _f32_hex(value: float) -> str:
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def _exp2_asm(every: int) -> str:
    """PTX for ``pack = every`` values: ``every - 1`` on ``ex2.approx``, the last by the polynomial."""
    c0, c1, c2, c3 = map(_f32_hex, EXP2_COEFFS)
    lines = ["{", ".reg .f32 x, t, j, f, p;", ".reg .b32 e, r;"]
    lines += [f"ex2.approx.ftz.f32 ${i}, ${every + i};" for i in range(every - 1)]
    last = every - 1
    lines += [
        f"max.NaN.f32 x, ${every + last}, 0fC2FA0000;",  # -125; a NaN stays a NaN
        "add.rn.ftz.f32 t, x, 0f4B400000;",  # + 1.5 * 2**23: rounds x to an integer j, held in t's low bits
        "sub.rn.ftz.f32 j, t, 0f4B400000;",
        "sub.rn.ftz.f32 f, x, j;",
        f"fma.rn.ftz.f32 p, f, {c3}, {c2};",
        f"fma.rn.ftz.f32 p, p, f, {c1};",
        f"fma.rn.ftz.f32 p, p, f, {c0};",
        "mov.b32 e, t;",
        "shl.b32 e, e, 23;",  # j << 23, two's complement: j's bits land on the exponent
        "mov.b32 r, p;",
        "add.s32 r, r, e;",
        "mov.b32 p, r;",
        "fma.rn.f32 p, x, 0f00000000, p;",  # + x * 0: a NaN x makes the result NaN (the bit arithmetic would not)
        f"mov.b32 ${last}, p;",
        "}",
    ]
    return "\n".join(lines)


EXP2_ASM_2: gl.constexpr = gl.constexpr(_exp2_asm(2))
EXP2_ASM_4: gl.constexpr = gl.constexpr(_exp2_asm(4))


# -- O's rescale skipped where it would multiply by 1. Once a row's running maximum settles, most tiles
# leave it unchanged and alpha = 2 ** (m_old - m_new) is exactly 1.0: the 64 x D multiplies of O then
# change no bit. A warp votes whether all its 16 rows kept their maximum and, if so, branches past them
# (the branch is warp-uniform: no divergence). A NaN alpha is not 1.0, so NaN still reaches O.
def _rescale_asm(n: int) -> str:
    """PTX for one thread's ``n`` accumulator values (operands ``$0..``: out, ``$n..``: in, ``$2n..``: each
    value's row factor). In the tensor cores' accumulator layout a thread's values belong to two rows:
    values 0 and 1 to row ``r``, 2 and 3 to row ``r + 8``, the pattern repeating."""
    a0, a1 = 2 * n, 2 * n + 2
    lines = ["{", ".reg .pred keep, keep2;",
             f"setp.eq.f32 keep, ${a0}, 0f3F800000;", f"setp.eq.f32 keep2, ${a1}, 0f3F800000;",
             "and.pred keep, keep, keep2;", "vote.sync.all.pred keep, keep, 0xffffffff;",
             "@keep bra.uni SKIP${:uid};"]
    lines += [f"mul.f32 ${i}, ${n + i}, ${2 * n + i};" for i in range(n)]
    lines += ["bra.uni DONE${:uid};", "SKIP${:uid}:"]
    lines += [f"mov.b32 ${i}, ${n + i};" for i in range(n)]
    lines += ["DONE${:uid}:", "}"]
    return "\n".join(lines)


RESCALE_ASM_64: gl.constexpr = gl.constexpr(_rescale_asm(64))  # head dim 128: 64 x 128 / 128 threads
RESCALE_ASM_32: gl.constexpr = gl.constexpr(_rescale_asm(32))  # head dim 64
RESCALE_CON_64: gl.constexpr = gl.constexpr(",".join(["=f"] * 64 + ["f"] * 128))
RESCALE_CON_32: gl.constexpr = gl.constexpr(",".join(["=f"] * 32 + ["f"] * 64))


@dataclass(frozen=True)
class Schedule:
    """How a consumer schedules one tile's softmax, per precision and head dim (``SCHEDULES``).

    Attributes:
        poly_every: one of every ``poly_every`` of P's exponentials by ``_exp2``'s polynomial (0: none).
        late_wait: hold the wait for ``P_t V_t`` behind the softmax of tile ``t + 1``
            (``_wait_products_after``); without it the compiler moves that wait above the softmax.
        rescale_skip: a warp skips O's rescale when none of its rows' maxima moved (``_rescale``); the
            output is bit-identical either way.
        joint_release: free tile ``t + 1``'s k slot together with tile ``t``'s v slot, once ``P_t V_t`` is
            done, rather than as soon as ``S_{t+1}`` is. Gluon synchronises the warpgroup before each
            ``mbarrier.arrive``; this puts a tile's two barriers back to back instead of one in the middle
            of its softmax. The loader still has a whole iteration to fetch the tile after next.
    """
    poly_every: int = 0
    late_wait: bool = False
    rescale_skip: bool = False
    joint_release: bool = False


# Keyed by (FP8, head dim); measured on an H200 side by side (docs/benchmarks-history.md; each schedule
# against the table's, reproduced by benchmarks/schedules_bench.py). 16 bits at d=128 (Wan2.1 shapes): the
# late wait is 2-6 % faster, skipping unit rescales 3-7 %, and the polynomial only adds work (-5 to -27 %).
# 16 bits at d=64 (CogVideoX-5B, and 24 heads at Wan2.1-1.3B's grid): the late wait is 2-6 % slower, the
# rescale skip 3 % slower, one in four by the polynomial no faster, one in two 15-18 % slower. FP8, with P
# fed from registers (_p_operand): skipping unit rescales 4 % faster at d=128 and 9 % at d=64; with it every
# exponential on the special-function unit 2-4 % (d=128) and 8 % (d=64) faster than one in four by the
# polynomial; the late wait 6 % (d=128) and 22 % (d=64) slower (its products are half as long as 16-bit
# ones). The polynomial keeps NaN scores NaN and masked keys at zero (tests/test_ws_kernel.py, on Hopper).
# The joint release won in no build in every round (H200, same inputs, 3 rounds; Wan2.1-14B 2): bf16 d128
# 2.833-3.133 against 2.842-2.894 ms at Wan2.1-1.3B, 48.03-52.53 against 49.00-49.28 ms at Wan2.1-14B;
# FP8 d128 2.500-2.504 both; d64 (CogVideoX-5B) bf16 3.093-3.103 against 3.079-3.129, FP8 3.169-3.193
# against 3.169-3.192. Waiting at one barrier per tile instead of two changed nothing measurable (the
# profile's barrier stalls may be waits for the slowest warp, which one barrier still makes; not profiled).
SCHEDULES = {
    (False, 128): Schedule(poly_every=0, late_wait=True, rescale_skip=True),
    (False, 64): Schedule(poly_every=0, late_wait=False),
    (True, 128): Schedule(poly_every=0, late_wait=False, rescale_skip=True),
    (True, 64): Schedule(poly_every=0, late_wait=False, rescale_skip=True),
}


@gluon.jit
def _opaque(x):
    """``x`` (an int32 scalar), through an instruction the compiler cannot merge with a later one: an
    address worked out from it is worked out afresh later, not kept in registers (or spilled) until then."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _kept_block(kept, t, n_blocks):
    """Index of the ``t``-th kept key block, clamped to ``[0, n_blocks)``: a mask edited after its checks can
    never move a TMA copy outside k and v, nor a scale load outside ``K_DESCALE``."""
    return gl.minimum(gl.maximum(gl.load(kept + t), 0), n_blocks - 1)


@gluon.jit
def _loader(desc_k, desc_v, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, kept, n, n_blocks, b, kv_h,
            v_row0, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, FP8: gl.constexpr):
    """Issue the TMA copies of the kept k and v tiles, each into a slot the consumers have freed.

    k (and 16-bit v) tiles are boxes ``[1, 1, BLOCK_N, D]`` at ``(b, kv_h, start, 0)``. In FP8 v is stored
    transposed (``[D, S]`` per head, one 2-D row per (head, channel)): its tile starts at column ``start``."""
    for t in range(n):
        slot = t % STAGES
        phase = (t // STAGES) & 1
        start = _kept_block(kept, t, n_blocks) * BLOCK_N
        # -- slots start out free: the first wait on an empty barrier passes at once
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
        _tma_load(desc_k, [b, kv_h, start, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
        if FP8:
            _tma_load(desc_v, [v_row0, start], v_ready.index(slot), v_smem.index(slot))
        else:
            _tma_load(desc_v, [b, kv_h, start, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _exp2(x, POLY_EVERY: gl.constexpr):
    """``2 ** x`` for ``x <= 8`` (``-inf`` included): one in ``POLY_EVERY`` of a thread's values by the
    polynomial of ``_exp2_asm`` on the FMA units, the others on the special-function unit (0: all there)."""
    if POLY_EVERY == 2:
        y = gl.inline_asm_elementwise(EXP2_ASM_2, "=f,=f,f,f", [x], dtype=gl.float32, is_pure=True, pack=2)
    elif POLY_EVERY == 4:
        y = gl.inline_asm_elementwise(EXP2_ASM_4, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32, is_pure=True, pack=4)
    else:
        gl.static_assert(POLY_EVERY == 0, "POLY_EVERY is 0, 2 or 4")
        y = gl.exp2(x)
    return y


@gluon.jit
def _softmax(s, m_i, l_i, start, kv_len, qk_scale, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
             P_SHIFT: gl.constexpr, POLY_EVERY: gl.constexpr):
    """Online softmax step on one score tile: new max, probabilities, rescale factor, new sum.

    The probabilities come out times ``2 ** P_SHIFT`` (FP8's ``P_MULT``; 0 in 16 bits), and so does
    the row sum: the scaling costs no multiply and cancels in the normalisation."""
    if start + BLOCK_N > kv_len:  # the ragged last block: keys past the end never win
        cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where((cols < kv_len)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if P_SHIFT == 0:
        p = _exp2(s * qk_scale - m_new[:, None], POLY_EVERY)
    else:
        p = _exp2(s * qk_scale - (m_new - P_SHIFT)[:, None], POLY_EVERY)
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _rescale(acc, alpha_o, RESCALE_SKIP: gl.constexpr):
    """``acc * alpha_o[:, None]``; with ``RESCALE_SKIP`` by ``_rescale_asm``, which skips multiplies by 1."""
    if RESCALE_SKIP:
        per_thread: gl.constexpr = acc.shape[0] * acc.shape[1] // 128
        alpha, acc = gl.broadcast(alpha_o[:, None], acc)
        if per_thread == 64:
            acc = gl.inline_asm_elementwise(RESCALE_ASM_64, RESCALE_CON_64, [acc, alpha],
                                            dtype=gl.float32, is_pure=True, pack=64)
        else:
            gl.static_assert(per_thread == 32, "the rescale's PTX covers head dims 64 and 128")
            acc = gl.inline_asm_elementwise(RESCALE_ASM_32, RESCALE_CON_32, [acc, alpha],
                                            dtype=gl.float32, is_pure=True, pack=32)
    else:
        acc = acc * alpha_o[:, None]
    return acc


@gluon.jit
def _power_of_two_scale(amax):
    """``(multiplier, descale)`` of a group whose largest magnitude is ``amax``: exact powers of two
    (``rainfusion_core.fp8.power_of_two_scale``, from the float32 bits)."""
    bits = gl.maximum(amax, MIN_AMAX).to(gl.int32, bitcast=True)
    top = ((bits >> 23) & 0xFF) - 127
    multiplier = ((127 + TOP_EXPONENT - top) << 23).to(gl.float32, bitcast=True)
    descale = ((127 - TOP_EXPONENT + top) << 23).to(gl.float32, bitcast=True)
    return multiplier, descale


@gluon.jit
def _tile_info(qk_scale, K_DESCALE, kept, t, n_blocks, BLOCK_N: gl.constexpr, FP8: gl.constexpr):
    """``(first key row, softmax scale)`` of kept tile ``t``; the scale times its k block's scale in FP8.

    The consumers call it before they wait for the tile's scores, so the loads' latency hides under
    the products instead of delaying the softmax."""
    block = _kept_block(kept, t, n_blocks)
    scale = qk_scale
    if FP8:
        scale = qk_scale * gl.load(K_DESCALE + block)
    return block * BLOCK_N, scale


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, p_layout: gl.constexpr, FP8: gl.constexpr):
    """The probabilities as the A operand of ``P V`` (in FP8 already ``p * P_MULT``: ``_softmax``).

    FP8: the 8-bit A operand wants four consecutive keys per register where the scores' accumulator holds
    pairs. Rather than shuffle P between threads, the keys of each 32-key chunk are taken in the order in
    which P's registers already sit (column ``k`` is key ``c`` with ``c``'s bits 4..0 = ``k``'s bits 4, 1, 3,
    2, 0), and v was written in that order (``quantize.key_slots``), so ``P V`` is unchanged and the
    layout conversion below moves nothing."""
    p = p.to(dtype)
    if FP8:
        rows: gl.constexpr = p.shape[0]
        cols: gl.constexpr = p.shape[1]
        p = gl.reshape(p, [rows, cols // 32, 2, 2, 2, 2, 2])  # row, chunk, key bits 4, 3, 2, 1, 0
        p = gl.reshape(gl.permute(p, [0, 1, 2, 4, 5, 3, 6]), [rows, cols])  # P_KEY_DIMS: key bits 4, 2, 1, 3, 0
    return gl.convert_layout(p, p_layout)


@gluon.jit
def _k_operand(k_smem, slot, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """The B operand of ``Q K^T``: the k tile (a ``[1, 1, keys, D]`` box), seen as ``[D, keys]``."""
    return k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))


@gluon.jit
def _v_operand(v_smem, slot, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, FP8: gl.constexpr):
    """The B operand of ``P V``: the v tile, seen as ``[keys, D]`` (FP8 stores it ``[D, keys]``)."""
    if FP8:
        tile = v_smem.index(slot).permute((1, 0))
    else:
        tile = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
    return tile


@gluon.jit
def _wait_products_after(l_i):
    """Wait for every tensor-core product of this warpgroup once ``l_i`` (the new row sums) exists.

    The compiler otherwise moved the wait for P_t V_t above the softmax that should run under it: a wait
    behind a branch on ``l_i`` (never taken: a row sum is never negative) cannot move up past the softmax."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred neg; setp.lt.f32 neg, $1, 0f00000000; @neg bra SKIP${:uid}; "
        "wgmma.wait_group.sync.aligned 0; SKIP${:uid}: mov.b32 $0, $1; }",
        "=f,f", [l_i], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _flush(total_smem, acc, beta, t, o_layout: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    """FP8: after every FLUSH_EVERY tiles' products (``t`` the last one's index) move O out of the tensor
    cores' accumulator into the float32 total in shared memory (``_consumer``)."""
    if t % FLUSH_EVERY == FLUSH_EVERY - 1:
        total_smem.store(total_smem.load(o_layout) * beta[:, None] + acc)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        beta = gl.full([ROWS], 1.0, gl.float32, layout=gl.SliceLayout(1, o_layout))
    return acc, beta


@gluon.jit
def _consumer(Q, Out, ORDER, K_DESCALE, V_DESCALE, LSE, q_off, o_off, lse_off, stride_qs, stride_os, q_len, kv_len,
              m0, kept, n, n_blocks, qk_scale, q_smem, k_smem, v_smem, o_smem, k_ready, k_empty, v_ready, v_empty,
              WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              FP8: gl.constexpr, WRITE_LSE: gl.constexpr, POLY_EVERY: gl.constexpr,
              LATE_WAIT: gl.constexpr, RESCALE_SKIP: gl.constexpr, JOINT_RELEASE: gl.constexpr):
    """One warpgroup: ROWS query rows against every kept key tile, FlashAttention-3 order.

    FP8 (``rainfusion_core.fp8``): q is rounded here with one power-of-two scale for the
    warpgroup's rows; each k tile brings its block's scale (``K_DESCALE``), folded into the
    softmax scale of that tile; P is stored as ``p * P_MULT`` and v (transposed) has one scale
    per channel (``V_DESCALE``), both undone in the epilogue.

    Hopper's FP8 products add into the tensor cores' accumulator with fewer bits than float32.
    Left there across every kept tile (as FlashAttention-3 does), that raised the error against
    bf16 at the Wan2.1-1.3B shape from relative L2 0.041 (the roundings alone) to 0.068, and to
    0.098 at Wan2.1-14B's 75600 tokens. So every ``FLUSH_EVERY`` tiles the accumulator is added
    to a float32 total kept in shared memory (``o_smem``; ``beta`` is the rescaling the
    accumulator has had since), and O is ``total * beta + acc``. Adding every tile's product in
    registers instead spilled beside the score tile and ran slower than the bf16 kernel
    (docs/benchmarks-history.md).
    """
    MMA_K: gl.constexpr = 32 if FP8 else 16  # the tensor-core instruction's depth: 32 bytes
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, MMA_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, MMA_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4 if FP8 else 2)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    dtype: gl.constexpr = q_smem.dtype  # of the tensor-core operands
    out_dtype: gl.constexpr = Out.dtype.element_ty

    # -- this warpgroup's query rows, gathered through the permutation into shared memory
    offs_m = _opaque(m0) + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    m_ok = offs_m < q_len
    rows = gl.load(ORDER + offs_m, mask=m_ok, other=0).to(gl.int64)
    q = gl.load(Q + q_off + rows[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    q_tile = q_smem.index(WG)
    if FP8:
        q = q.to(gl.float32)
        q_mult, q_descale = _power_of_two_scale(gl.max(gl.max(gl.abs(q), 1), 0))
        q_tile.store((q * q_mult).to(dtype))
        qk_scale = qk_scale * q_descale
    else:
        q_tile.store(q)
    fence_async_shared()

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    if FP8:  # O = total * beta + acc: total in float32 in shared memory, beta the rescaling acc has had since
        total_smem = o_smem.index(WG)
        total_smem.store(gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout))
        beta = gl.full([ROWS], 1.0, gl.float32, layout=gl.SliceLayout(1, o_layout))

    if n > 0:
        # -- tile 0: scores and probabilities; nothing to accumulate yet
        start, scale = _tile_info(qk_scale, K_DESCALE, kept, 0, n_blocks, BLOCK_N, FP8)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_tile, _k_operand(k_smem, 0, BLOCK_N, HEAD_DIM), zero_s, use_acc=False,
                              is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start, kv_len, scale, s_layout, BLOCK_N,
                                      P_SHIFT if FP8 else 0, POLY_EVERY)

        for t in range(0, n - 1):
            nxt = (t + 1) % STAGES
            cur = t % STAGES
            start, scale = _tile_info(qk_scale, K_DESCALE, kept, t + 1, n_blocks, BLOCK_N, FP8)
            # -- issue S_{t+1} = Q K_{t+1}^T, rescale O, issue O += P_t V_t
            mbarrier.wait(k_ready.index(nxt), ((t + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(q_tile, _k_operand(k_smem, nxt, BLOCK_N, HEAD_DIM), zero_s, use_acc=False,
                                  is_async=True)
            alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            acc = _rescale(acc, alpha_o, RESCALE_SKIP)
            if FP8:
                beta = beta * alpha_o
            mbarrier.wait(v_ready.index(cur), (t // STAGES) & 1)
            o_tok = warpgroup_mma(_p_operand(p, dtype, p_layout, FP8),
                                  _v_operand(v_smem, cur, BLOCK_N, HEAD_DIM, FP8), acc, is_async=True)
            # -- softmax of S_{t+1} while P_t V_t runs
            s = warpgroup_mma_wait(1, deps=[s_tok])
            if not JOINT_RELEASE:
                mbarrier.arrive(k_empty.index(nxt), count=1)
            p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start, kv_len, scale, s_layout, BLOCK_N,
                                          P_SHIFT if FP8 else 0, POLY_EVERY)
            if LATE_WAIT:
                l_i = _wait_products_after(l_i)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            mbarrier.arrive(v_empty.index(cur), count=1)
            if JOINT_RELEASE:
                mbarrier.arrive(k_empty.index(nxt), count=1)
            if FP8:
                acc, beta = _flush(total_smem, acc, beta, t, o_layout, ROWS, HEAD_DIM)

        # -- the last tile's P V
        last = n - 1
        alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        acc = _rescale(acc, alpha_o, RESCALE_SKIP)
        if FP8:
            beta = beta * alpha_o
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        o_tok = warpgroup_mma(_p_operand(p, dtype, p_layout, FP8),
                              _v_operand(v_smem, last % STAGES, BLOCK_N, HEAD_DIM, FP8), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[o_tok])
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)

    # -- epilogue: normalise; a row with no kept block stays zero; scatter back through ORDER
    if WRITE_LSE:  # m_i and l_i are in base 2: ln(sum) = (m + log2 l) * ln 2; -inf for a row with no kept key
        lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_i)) * 0.6931471805599453)
        offs_l = m0 + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))  # in the scores' layout:
        l_ok = offs_l < q_len  # no layout change, the row indices read again instead
        gl.store(LSE + lse_off + gl.load(ORDER + offs_l, mask=l_ok, other=0).to(gl.int64), lse, mask=l_ok)
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    if FP8:  # the float32 total; undo v's channel scales and P's multiplier
        acc = total_smem.load(o_layout) * beta[:, None] + acc
        offs_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        acc = acc * gl.load(V_DESCALE + offs_o)[None, :]  # P_MULT cancels: l_i holds it too (_softmax)
    out = (acc / gl.where(l_o == 0.0, 1.0, l_o)[:, None]).to(out_dtype)
    out = gl.convert_layout(out, ld_layout)
    # the rows' indices read again (from L2) rather than held in registers across the loop, where they spilled;
    # the first read's addresses went through _opaque, so that these are not the same values kept since then
    offs_m = m0 + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ld_layout))
    m_ok = offs_m < q_len
    rows = gl.load(ORDER + offs_m, mask=m_ok, other=0).to(gl.int64)
    gl.store(Out + o_off + rows[:, None] * stride_os + offs_d[None, :], out, mask=m_ok[:, None])


@gluon.jit
def block_sparse_attention_fwd_ws(
    Q, Out, desc_k, desc_v, KV_COUNTS, KV_INDICES, ORDER, K_DESCALE, V_DESCALE, LSE,
    stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_ir, stride_lb, stride_lh,
    q_heads, kv_heads, q_len, kv_len, n_blocks, qk_scale,
    HEAD_DIM: gl.constexpr, GROUP: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FP8: gl.constexpr,
    WRITE_LSE: gl.constexpr = False, POLY_EVERY: gl.constexpr = 0, LATE_WAIT: gl.constexpr = False,
    RESCALE_SKIP: gl.constexpr = False, JOINT_RELEASE: gl.constexpr = False,
):
    """One program: 128 permuted query rows of one (batch, head) over the kept key tiles of their mask row.

    ``desc_k`` and ``desc_v`` are 4-D (``[B, Hkv, kv_len, D]``): a ragged last tile gets zeros past ``kv_len``
    from TMA, never the next head's rows, whose NaN or inf a zero probability would carry into the output.
    FP8: k and v are float8 (v transposed); ``K_DESCALE [B * Hkv, n_blocks]`` and
    ``V_DESCALE [B * Hkv, HEAD_DIM]`` hold their scales (unused otherwise). With ``WRITE_LSE`` each
    row's natural log-sum-exp goes to ``LSE [B, H, S]`` (unit stride along S) at the row its output goes to."""
    gl.static_assert(not (FP8 and WRITE_LSE), "the FP8 kernel does not write the log-sum-exp")
    dtype: gl.constexpr = desc_k.dtype
    pid_m = gl.program_id(0)  # query blocks vary fastest: CTAs running together share one head's k and v in L2
    pid_bh = gl.program_id(1)
    b = pid_bh // q_heads
    h = pid_bh % q_heads
    b64 = b.to(gl.int64)
    q_off = b64 * stride_qb + h * stride_qh
    o_off = b64 * stride_ob + h * stride_oh
    lse_off = b64 * stride_lb + h * stride_lh

    # -- this block's mask row: n kept tiles (clamped to the row's length), their block indices at `kept`
    n = gl.minimum(gl.maximum(gl.load(KV_COUNTS + b64 * stride_cb + h * stride_ch + pid_m), 0), n_blocks)
    kept = KV_INDICES + b64 * stride_ib + h * stride_ih + pid_m * stride_ir
    kv_h = h // GROUP
    kv_head = b * kv_heads + kv_h
    k_descale = K_DESCALE + kv_head * n_blocks
    v_descale = V_DESCALE + kv_head * HEAD_DIM

    # -- shared memory: two 64-row query tiles, two-slot k and v rings with their barriers
    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype))
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
    if FP8:  # each consumer's float32 running total of O (see _consumer)
        o_smem = gl.allocate_shared_memory(gl.float32, [2, ROWS, HEAD_DIM],
                                        gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], gl.float32))
    else:
        o_smem = q_smem  # not read
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()

    m0 = pid_m * (2 * ROWS)
    gl.warp_specialize([
        (_consumer, (Q, Out, ORDER, k_descale, v_descale, LSE, q_off, o_off, lse_off, stride_qs, stride_os, q_len,
                     kv_len, m0, kept, n, n_blocks, qk_scale, q_smem, k_smem, v_smem, o_smem, k_ready, k_empty,
                     v_ready, v_empty, 0, HEAD_DIM, BLOCK_N, STAGES, FP8, WRITE_LSE, POLY_EVERY, LATE_WAIT,
                     RESCALE_SKIP, JOINT_RELEASE)),
        (_consumer, (Q, Out, ORDER, k_descale, v_descale, LSE, q_off, o_off, lse_off, stride_qs, stride_os, q_len,
                     kv_len, m0, kept, n, n_blocks, qk_scale, q_smem, k_smem, v_smem, o_smem, k_ready, k_empty,
                     v_ready, v_empty, 1, HEAD_DIM, BLOCK_N, STAGES, FP8, WRITE_LSE, POLY_EVERY, LATE_WAIT,
                     RESCALE_SKIP, JOINT_RELEASE)),
        (_loader, (desc_k, desc_v, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, kept, n, n_blocks, b, kv_h,
                   kv_head * HEAD_DIM, STAGES, BLOCK_N, FP8)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def kernel_constants(head_dim: int, fp8: bool, lse: bool = False, group: int = 1) -> dict:
    """The kernel's compile-time arguments for one build, as ``launch`` passes them (and
    ``tools/compile_hopper_kernel.py`` compiles them): its tuning and its schedule."""
    schedule = SCHEDULES[fp8, head_dim]
    return dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_N=BLOCK, STAGES=TUNING[head_dim]["stages"], FP8=fp8,
                WRITE_LSE=lse, POLY_EVERY=schedule.poly_every, LATE_WAIT=schedule.late_wait,
                RESCALE_SKIP=schedule.rescale_skip, JOINT_RELEASE=schedule.joint_release)


def unsupported_reason(q: torch.Tensor, mask_block: int) -> str | None:
    """Why this kernel cannot run the call (None when it can): sm_90, 16-bit, head dim 64 or 128, 128-token blocks."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "it needs an sm_90 (Hopper) GPU"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in TUNING or mask_block != BLOCK:
        dims = " or ".join(map(str, SUPPORTED_HEAD_DIMS))
        return f"it needs head dim {dims} and {BLOCK}-token mask blocks, got {q.shape[-1]} and {mask_block}"
    return None


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv}


def kv_descriptor(x: torch.Tensor, name: str) -> TensorDescriptor:
    """A 4-D TMA descriptor of ``[B, Hkv, S, D]`` k (or 16-bit v), in ``[1, 1, BLOCK, D]`` boxes: rows past S
    come back as zeros, per head. Raises, naming the tensor, where TMA cannot read it (``tma_readable``)."""
    if not tma_readable(x):
        raise ValueError(f"{name}: TMA needs a unit last stride and nonzero, 16-byte aligned strides and start, got "
                         f"strides {x.stride()} of {x.dtype} at offset {x.data_ptr() % 16} from 16 bytes")
    box = [1, 1, BLOCK, x.shape[-1]]
    return TensorDescriptor(x, list(x.shape), list(x.stride()), box,
                            gl.NVMMASharedLayout.get_default_for(box, _GL_DTYPES[x.dtype]))


def v8t_descriptor(v: torch.Tensor) -> TensorDescriptor:
    """A 2-D TMA descriptor of FP8's transposed ``[B, Hkv, D, S_pad]`` v (contiguous), in ``[D, BLOCK]`` boxes:
    one row per (head, channel), so a tile past ``S_pad`` gets TMA's zeros, never another head's keys."""
    head_dim, width = v.shape[-2], v.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([head_dim, BLOCK], gl.float8e4nv)
    return TensorDescriptor(v, [v.numel() // width, width], [width, 1], [head_dim, BLOCK], layout)


def _check_fp8_operands(v, k_descale, v_descale, v_shape: tuple, n_blocks: int) -> None:
    """FP8's v8t and scales as ``quantize.quantize_kv`` writes them: the kernel reads ``v_shape``'s rows and
    ``n_blocks`` (``D``) scales per kv head, so anything smaller would be read past its end."""
    batch, kv_heads, head_dim, s_pad = v_shape
    for name, x, dtype, shape in (("v", v, torch.float8_e4m3fn, v_shape),
                                  ("k_descale", k_descale, torch.float32, (batch, kv_heads, n_blocks)),
                                  ("v_descale", v_descale, torch.float32, (batch, kv_heads, head_dim))):
        if tuple(x.shape) != shape or x.dtype != dtype or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {list(shape)}, as "
                             f"quantize.quantize_kv writes it (v: [B, Hkv, D, S_pad], S_pad = {s_pad}), got "
                             f"{x.dtype} {list(x.shape)}{'' if x.is_contiguous() else ' (not contiguous)'}")


def launch(q, k, v, out, kv_counts, kv_indices, order, scale: float, k_descale=None, v_descale=None,
           lse=None) -> None:
    """Run the kernel on ``[B, H, S, D]`` views (any strides, unit last stride): q read and out written
    through ``order``; k and v already in permuted order, any 16-byte aligned strides (streamed by TMA,
    zeros past S per head). ``kv_counts [B, H, nb]`` and ``kv_indices [B, H, nb, nb]`` may be head slices
    of a larger mask (unit last stride).

    FP8 (``rainfusion_core.fp8``): k is float8 ``[B, Hkv, S, D]`` with ``k_descale [B, Hkv, nb]``,
    v is float8 *transposed*, ``[B, Hkv, D, S_pad]`` (``S_pad``: S rounded up to 32, keys reordered within
    each 32-key chunk as ``quantize.key_slots`` says, zeros past S) with
    ``v_descale [B, Hkv, D]``, as ``backends/triton/quantize.py`` writes them; q stays 16-bit. FP8 v is
    one 2-D row per (head, channel): past S a tile reads that row's zeros (up to ``S_pad``) and TMA's
    zero fill (past it), never another head's keys.
    ``lse`` (float32 ``[B, H, S]``, unit stride along S; 16-bit calls) receives each row's log-sum-exp.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    fp8 = k.dtype == torch.float8_e4m3fn
    desc_k = kv_descriptor(k, "k")
    if fp8:  # v8t rows are (head, channel) pairs, keys reordered within 32-key chunks and zero past kv_len
        _check_fp8_operands(v, k_descale, v_descale, (batch, kv_heads, head_dim, padded_length(kv_len)),
                            kv_indices.shape[3])
        desc_v = v8t_descriptor(v)
    else:
        k_descale = v_descale = kv_counts  # not read: a placeholder pointer
        desc_v = kv_descriptor(v, "v")
    grid = (-(-q_len // BLOCK), batch * heads)
    block_sparse_attention_fwd_ws[grid](
        q, out, desc_k, desc_v, kv_counts, kv_indices, order, k_descale, v_descale,
        kv_counts if lse is None else lse,
        *q.stride()[:3], *out.stride()[:3], *kv_counts.stride()[:2], *kv_indices.stride()[:3],
        *((0, 0) if lse is None else lse.stride()[:2]),
        heads, kv_heads, q_len, kv_len, kv_indices.shape[3], scale * 1.4426950408889634,
        **kernel_constants(head_dim, fp8, lse is not None, heads // kv_heads),
        num_warps=4, maxnreg=(2 * CONSUMER_REGS + LOADER_REGS) // 3,
    )
