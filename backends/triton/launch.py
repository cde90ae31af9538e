"""Launching the Triton attention kernels: which kernel, which tiles, which copies.

Imported only when the ``triton`` backend runs. :func:`block_sparse_attention_triton`
picks the warp-specialised Hopper kernel (``hopper/attention.py``) where it applies
and the portable kernel (``attention.py``) elsewhere; both compute the same thing.
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
from dataclasses import dataclass

import torch

from rainfusion_core._checks import describe
from rainfusion_core.caching import may_cache
from rainfusion_core.fp8 import FP8_DTYPE
from rainfusion_core.precision import DEFAULT_PRECISION, get_precision

from .tma import tma_readable


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read before Triton loads)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TritonOptions:
    """The Triton launcher's knobs in one place; the defaults are what the backend runs.

    Attributes:
        kernel: ``"auto"`` (the warp-specialised Hopper kernel where it applies, else the
            portable one), ``"ws"`` (insist on the Hopper kernel; an error says why it
            cannot run) or ``"triton"`` (the portable kernel). Both compute the same
            thing, bit for bit.
        config: tiles and launch parameters of the portable kernel (``None``: the tuned
            ``attention.pick_config``); for the benchmarks' sweeps.
        use_tma: TMA descriptors for the portable kernel on or off (``None``: where usable);
            for the benchmarks.
        gather_kv: with ``order``, the portable kernel reads k and v rows through it
            (``True``) or streams permuted copies of all of k and v (``False``, a
            benchmark variant).
    """

    kernel: str = "auto"
    config: object = None  # attention.KernelConfig; typed loosely so this module does not import Triton
    use_tma: bool | None = None
    gather_kv: bool = True

    def __post_init__(self):
        if self.kernel not in ("auto", "ws", "triton"):
            raise ValueError(f"kernel must be 'auto', 'ws' or 'triton', got {self.kernel!r}")


DEFAULT_OPTIONS = TritonOptions()


@dataclass(frozen=True)
class LaunchPlan:
    """What :func:`plan_launch` decided for one class of calls; cached, reused by every call of the class.

    ``kernel == "ws"``: the Hopper kernel, k/v copied ``head_step`` kv heads at a time
    (0: k and v are already permuted and TMA can read them, ``tma.tma_readable``: no copy); with ``fp8`` k and v are
    quantised by ``quantize.py`` instead, all heads in one pass. ``"triton"``: the portable
    kernel with ``config``, mask block ``mask_block``, rows gathered through the
    permutation (``gather_q``/``gather_kv``) and TMA descriptors (``tma_q``/``tma_kv``).
    """

    kernel: str
    head_step: int = 0
    fp8: bool = False
    config: object = None
    mask_block: int = 0
    gather_q: bool = False
    gather_kv: bool = False
    tma_q: bool = False
    tma_kv: bool = False


_PLANS: dict[tuple, LaunchPlan] = {}
_PLANS_SIZE = 256


def block_sparse_attention_triton(q, k, v, block_mask, scale, *, order=None, out=None,
                                  options: TritonOptions | None = None, precision: str = DEFAULT_PRECISION, lse=None,
                                  **legacy):
    """Launch a kernel; ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` with any strides.

    Without ``order`` the tensors are in the mask's (permuted) order. With
    ``order`` (``[S]`` integer, ``permuted[i] = original[order[i]]``) q, k, v
    and ``out`` stay in the model's order: query rows are read through
    ``order`` and each output row is written back to where its query came from.
    ``out`` (``[B, Hq, Sq, D]``, any strides) is written in place when given.
    No host synchronisation: the loop bound of every program is read on the device.

    ``options`` (:class:`TritonOptions`) picks the kernel and tunes it. The choice of
    kernel, tiles, head chunks and TMA is made once per class of calls (shapes, dtype,
    strides, alignment, mask block, options) by :func:`plan_launch` and cached.
    The keywords ``kernel=``, ``config=``, ``use_tma=`` and ``gather_kv=`` are the
    deprecated spelling of ``options`` (one release).
    ``precision="fp8"`` runs the Hopper kernel in FP8 (``rainfusion_core.fp8``) or raises
    with the reason it cannot; it never runs the call in 16 bits instead.
    ``lse`` (float32 ``[B, Hq, Sq]``, unit stride along Sq) receives each row's natural
    log-sum-exp, at the row its output goes to; both kernels write it in 16 bits (not in FP8).
    """
    options = _options(options, legacy)
    if lse is not None:
        if (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3]) or lse.dtype != torch.float32
                or lse.device != q.device or (lse.numel() and lse.stride(-1) != 1)):
            raise ValueError(f"lse must be a float32 tensor of shape {tuple(q.shape[:3])} ([B, Hq, Sq]) on {q.device} "
                             f"with unit stride along Sq, got {describe(lse)}"
                             + (f" with strides {lse.stride()} on {lse.device}" if isinstance(lse, torch.Tensor) else ""))
        if get_precision(precision).operand_dtype is not None:
            raise ValueError(f"precision={precision!r} cannot return the log-sum-exp: the FP8 kernel does not write it")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    plan = plan_launch(q, k, v, out, block_mask, order, options, precision)
    if plan.kernel == "ws":
        _run_ws(plan, q, k, v, block_mask, scale, order, out, lse)
    else:
        _run_triton(plan, q, k, v, block_mask, scale, order, out, lse)
    return out


def _options(options: TritonOptions | None, legacy: dict) -> TritonOptions:
    if legacy:
        unknown = set(legacy) - {"kernel", "config", "use_tma", "gather_kv"}
        if unknown:
            raise TypeError(f"block_sparse_attention_triton() got unexpected keyword arguments {sorted(unknown)}")
        if options is not None:
            raise TypeError("pass options= or the deprecated keywords, not both")
        warnings.warn("block_sparse_attention_triton(kernel=, config=, use_tma=, gather_kv=) is deprecated; pass "
                      "options=TritonOptions(...)", DeprecationWarning, stacklevel=3)
        return TritonOptions(**legacy)
    return DEFAULT_OPTIONS if options is None else options


def _signature(x: torch.Tensor) -> tuple:
    return tuple(x.shape), x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0


def plan_launch(q, k, v, out, block_mask, order, options: TritonOptions = DEFAULT_OPTIONS,
                precision: str = DEFAULT_PRECISION) -> LaunchPlan:
    """The launch plan of this call's class, made once and cached (no host synchronisation)."""
    key = (_signature(q), _signature(k), _signature(v), _signature(out), block_mask.block_size,
           tuple(block_mask.kv_indices.shape[2:]), order is None, options, precision)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_fp8_plan(q, out, block_mask, options) if get_precision(precision).operand_dtype == FP8_DTYPE else \
            _make_plan(q, k, v, out, block_mask, order, options)
        if len(_PLANS) >= _PLANS_SIZE:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _make_plan(q, k, v, out, block_mask, order, options: TritonOptions) -> LaunchPlan:
    if options.kernel != "triton":
        reason = _ws_unavailable_reason(q, out, block_mask.block_size)
        if reason is None and options.kernel == "auto" and q.shape[2] < _ws_min_tokens(q.shape[3]):
            reason = "shorter than where it beats the portable kernel"  # auto only: kernel="ws" still runs it
        if reason is None:  # permuted k and v that TMA can read need no copy (see _run_ws)
            in_place = order is None and tma_readable(k) and tma_readable(v)
            head_bytes = k.shape[0] * k.shape[2] * k.shape[3] * k.element_size()  # one kv head's k (or v) rows
            return LaunchPlan("ws", head_step=0 if in_place else _ws_head_chunks(q.shape[1], k.shape[1], head_bytes))
        if options.kernel == "ws":
            raise ValueError(f"kernel='ws' cannot run this call: {reason}")
    from . import attention as kernels

    q_len, head_dim = q.shape[2], q.shape[3]
    mask_block = block_mask.block_size
    if block_mask.kv_indices.shape[2:] == (1, 1):  # one block each side: any block size >= the lengths is
        mask_block = min(mask_block, -(-max(q_len, k.shape[2]) // 128) * 128)  # the same; work follows S
    gather_q = order is not None
    gather_kv = gather_q and options.gather_kv
    config = options.config or kernels.pick_config(head_dim, q.dtype, mask_block, gather_kv=gather_kv)
    use_tma = options.use_tma
    if use_tma is None:  # k and v gathered by a separate pass become fresh contiguous copies: TMA-ready
        copies = gather_q and not gather_kv
        use_tma = not (gather_q and gather_kv) and _tma_usable(*((q, out) if copies else (q, k, v, out)))
    return LaunchPlan("triton", config=config, mask_block=mask_block, gather_q=gather_q, gather_kv=gather_kv,
                      tma_q=use_tma and not gather_q, tma_kv=use_tma and not gather_kv)


def _make_fp8_plan(q, out, block_mask, options: TritonOptions) -> LaunchPlan:
    """FP8 runs on the Hopper kernel only: its plan, or an error with the reason."""
    reason = fp8_unavailable_reason(q, block_mask.block_size, out)
    if reason is None and options.kernel == "triton":
        reason = "kernel='triton' names the portable kernel, which has no FP8 path"
    if reason is not None:
        raise ValueError(f"precision='fp8' cannot run this call: {reason}")
    return LaunchPlan("ws", fp8=True)


def fp8_unavailable_reason(q, mask_block: int, out=None) -> str | None:
    """Why the FP8 kernel cannot run a call with this q (None when it can)."""
    reason = _ws_unavailable_reason(q, q if out is None else out, mask_block)
    return None if reason is None else f"FP8 runs on the Hopper kernel, and {reason}"


def _ws_unavailable_reason(q, out, mask_block: int) -> str | None:
    if interpreting():
        return "the Triton interpreter does not run Gluon kernels"
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        return "q and out need a unit stride along the head dim"
    try:
        from .hopper import attention as ws
    except (ImportError, AttributeError) as exc:  # Gluon is experimental: absent or renamed in some Triton releases
        return f"this Triton has no usable Gluon ({exc})"
    return ws.unsupported_reason(q, mask_block)


def _ws_min_tokens(head_dim: int) -> int:
    from .hopper import attention as ws

    return ws.TUNING.get(head_dim, {}).get("min_tokens", 0)


# Copies up to this size are made in one chunk: each further chunk is another launch whose last wave
# runs part-empty. H100, kernel time of the whole call, one chunk against two: CogVideoX-5B (218 MB of
# copies) 3.13 against 3.17 ms, Wan2.1-1.3B (201 MB) 2.93 against 3.08 ms (docs/benchmarks-history.md).
ONE_CHUNK_BYTES = 256 << 20


def _ws_head_chunks(q_heads: int, kv_heads: int, head_bytes: int = 0) -> int:
    """kv heads per chunk, so that the k and v copies of one chunk stay within a third of q + k + v.

    One kv head's copies are 2 [S, D] rows of q + k + v's ``q_heads + 2 kv_heads``;
    a single head (step 1) is the floor. Copies of at most :data:`ONE_CHUNK_BYTES` in all
    (``head_bytes``: one kv head's k rows, all batch items) are made in one chunk.
    """
    third = (q_heads + 2 * kv_heads) // 6
    small = ONE_CHUNK_BYTES // (2 * head_bytes) if head_bytes else 0
    return max(1, min(kv_heads, max(third, small)))


_IDENTITY: dict[tuple[int, torch.device], torch.Tensor] = {}


def _run_ws(plan: LaunchPlan, q, k, v, block_mask, scale, order, out, lse=None) -> None:
    from .hopper import attention as ws

    counts, indices = block_mask.kv_counts, block_mask.kv_indices
    if counts.stride(-1) != 1 or indices.stride(-1) != 1:
        counts, indices = counts.contiguous(), indices.contiguous()
    # q rows are read (and out rows written) through q_order, k and v rows gathered through kv_order: one
    # permutation in model order; for permuted inputs two identities, each as long as what it indexes
    q_order, kv_order = (order, order) if order is not None else (_identity(q.shape[2], q.device),
                                                                  _identity(k.shape[2], k.device))
    if plan.fp8:  # k and v quantised (and v transposed) in one pass, all heads; q is rounded in the kernel
        from .quantize import quantize_kv

        k8, k_descale, v8t, v_descale = quantize_kv(k, v, kv_order, ws.BLOCK)
        ws.launch(q, k8, v8t, out, counts, indices, q_order, scale, k_descale, v_descale)
        return
    if plan.head_step == 0:  # already permuted, strides TMA can read: no copy at all
        ws.launch(q, k, v, out, counts, indices, q_order, scale, lse=lse)
        return
    from .permute import gather_rows_into as gather

    batch, kv_heads, kv_len, head_dim = k.shape
    group = q.shape[1] // kv_heads
    step = plan.head_step
    # One pair of buffers serves every chunk (stream order makes reuse safe); a chunk's copies are
    # views of their first batch * heads * S * D elements, contiguous as TMA needs them.
    k_buf, v_buf = (torch.empty(batch * step * kv_len * head_dim, dtype=k.dtype, device=k.device) for _ in range(2))
    for h0 in range(0, kv_heads, step):
        heads = min(step, kv_heads - h0)
        shape = (batch, heads, kv_len, head_dim)
        k_perm = gather(kv_order, k[:, h0:h0 + heads], k_buf[:k_buf.numel() * heads // step].view(shape))
        v_perm = gather(kv_order, v[:, h0:h0 + heads], v_buf[:v_buf.numel() * heads // step].view(shape))
        qh = slice(h0 * group, (h0 + heads) * group)
        ws.launch(q[:, qh], k_perm, v_perm, out[:, qh], counts[:, qh], indices[:, qh], q_order, scale,
                  lse=None if lse is None else lse[:, qh])


def _identity(length: int, device: torch.device) -> torch.Tensor:
    """``arange(length)``, cached; never cached from inside a CUDA-graph capture, where it is not yet written."""
    key = (length, device)
    cached = _IDENTITY.get(key)
    if cached is None:
        cached = torch.arange(length, device=device)
        if may_cache(device):
            _IDENTITY[key] = cached
    return cached


def _run_triton(plan: LaunchPlan, q, k, v, block_mask, scale, order, out, lse=None) -> None:
    from . import attention as kernels

    batch, q_heads, q_len, head_dim = q.shape
    config, gather_q, gather_kv = plan.config, plan.gather_q, plan.gather_kv
    if gather_q and not gather_kv:
        from .permute import gather_rows

        k, v = gather_rows(order, k, v)
    counts = block_mask.kv_counts.contiguous()
    indices = block_mask.kv_indices.contiguous()
    descs = [None] * 4
    if plan.tma_q or plan.tma_kv:
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = [
            TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, head_dim])
            for x, rows in ((q, config.block_m), (k, config.block_n), (v, config.block_n), (out, config.block_m))
        ]
    grid = (math.ceil(q_len / config.block_m), batch * q_heads)
    kernels.block_sparse_attention_fwd[grid](
        q, k, v, out, counts, indices, counts if order is None else order, counts if lse is None else lse, *descs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *((0, 0) if lse is None else lse.stride()[:2]),
        q_heads, q_len, k.shape[2], indices.shape[2], indices.shape[3], scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        GROUP=q_heads // k.shape[1],
        MASK_BLOCK=plan.mask_block,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, _next_power_of_2(head_dim)),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        TMA_Q=plan.tma_q,
        TMA_KV=plan.tma_kv,
        GATHER_Q=gather_q,
        GATHER_KV=gather_kv,
        WRITE_LSE=lse is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _tma_usable(*tensors) -> bool:
    """TMA needs a Hopper-or-newer GPU, a power-of-two head dim and tensors it can read (``tma_readable``)."""
    q = tensors[0]
    if interpreting() or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    head_dim = q.shape[-1]
    if head_dim != _next_power_of_2(head_dim) or head_dim < 16:
        return False
    try:
        importlib.import_module("triton.tools.tensor_descriptor")
    except ImportError:
        return False
    return all(tma_readable(x) for x in tensors)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
