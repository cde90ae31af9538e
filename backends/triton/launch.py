"""Launching the Triton attention kernels: which kernel, which tiles, which copies.

Imported only when the ``triton`` backend runs. :func:`block_sparse_attention_triton`
picks the warp-specialised Hopper kernel (``hopper/attention.py``) where it applies
and the portable kernel (``attention.py``) elsewhere; both compute the same thing.
"""
from __future__ import annotations

import importlib
import math
import os

import torch

from rainfusion_core.caching import may_cache


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read before Triton loads)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_sparse_attention_triton(q, k, v, block_mask, scale, *, order=None, out=None, gather_kv=True,
                                  kernel="auto", config=None, use_tma=None):
    """Launch a kernel; ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` with any strides.

    Without ``order`` the tensors are in the mask's (permuted) order. With
    ``order`` (``[S]`` integer, ``permuted[i] = original[order[i]]``) q, k, v
    and ``out`` stay in the model's order: query rows are read through
    ``order`` and each output row is written back to where its query came from.
    ``out`` (``[B, Hq, Sq, D]``, any strides) is written in place when given.
    No host synchronisation: the loop bound of every program is read on the device.

    ``kernel`` picks the implementation; both compute the same thing, bit for bit:

    * ``"ws"``: the warp-specialised Hopper kernel of ``hopper/attention.py``
      (sm_90, 16-bit, head dim 128, 128-token blocks). k and v are gathered into
      permuted copies a few kv heads at a time (:func:`_ws_head_chunks`), so the
      copies never exceed a third of q + k + v.
    * ``"triton"``: the portable Triton kernel. It reads k and v rows through
      ``order`` too (no copy), or with ``gather_kv=False`` streams permuted copies
      of all of k and v by TMA; ``config`` and ``use_tma`` tune it.
    * ``"auto"`` (default): ``"ws"`` where it applies, else ``"triton"``.
    """
    if kernel not in ("auto", "ws", "triton"):
        raise ValueError(f"kernel must be 'auto', 'ws' or 'triton', got {kernel!r}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if kernel != "triton":
        reason = _ws_unavailable_reason(q, out, block_mask.block_size)
        if reason is None:
            _run_ws(q, k, v, block_mask, scale, order, out)
            return out
        if kernel == "ws":
            raise ValueError(f"kernel='ws' cannot run this call: {reason}")
    _run_triton(q, k, v, block_mask, scale, order, out, gather_kv=gather_kv, config=config, use_tma=use_tma)
    return out


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


def _ws_head_chunks(q_heads: int, kv_heads: int) -> int:
    """kv heads per chunk, so that the k and v copies of one chunk stay within a third of q + k + v.

    One kv head's copies are 2 [S, D] rows of q + k + v's ``q_heads + 2 kv_heads``;
    a single head (step 1) is the floor.
    """
    return max(1, min(kv_heads, (q_heads + 2 * kv_heads) // 6))


_IDENTITY: dict[tuple[int, torch.device], torch.Tensor] = {}


def _run_ws(q, k, v, block_mask, scale, order, out) -> None:
    from .hopper import attention as ws

    counts, indices = block_mask.kv_counts, block_mask.kv_indices
    if counts.stride(-1) != 1 or indices.stride(-1) != 1:
        counts, indices = counts.contiguous(), indices.contiguous()
    if order is None:
        if k.is_contiguous() and v.is_contiguous():  # already permuted and TMA-ready: no copy at all
            ws.launch(q, k, v, out, counts, indices, _identity(q.shape[2], q.device), scale)
            return
        order = _identity(k.shape[2], k.device)
    from .permute import gather_rows_into as gather

    batch, kv_heads, kv_len, head_dim = k.shape
    group = q.shape[1] // kv_heads
    step = _ws_head_chunks(q.shape[1], kv_heads)
    # One pair of buffers serves every chunk (stream order makes reuse safe); a chunk's copies are
    # views of their first batch * heads * S * D elements, contiguous as TMA needs them.
    k_buf, v_buf = (torch.empty(batch * step * kv_len * head_dim, dtype=k.dtype, device=k.device) for _ in range(2))
    for h0 in range(0, kv_heads, step):
        heads = min(step, kv_heads - h0)
        shape = (batch, heads, kv_len, head_dim)
        k_perm = gather(order, k[:, h0:h0 + heads], k_buf[:k_buf.numel() * heads // step].view(shape))
        v_perm = gather(order, v[:, h0:h0 + heads], v_buf[:v_buf.numel() * heads // step].view(shape))
        qh = slice(h0 * group, (h0 + heads) * group)
        ws.launch(q[:, qh], k_perm, v_perm, out[:, qh], counts[:, qh], indices[:, qh], order, scale)


def _identity(length: int, device: torch.device) -> torch.Tensor:
    """``arange(length)``, cached; never cached from inside a CUDA-graph capture, where it is not yet written."""
    key = (length, device)
    cached = _IDENTITY.get(key)
    if cached is None:
        cached = torch.arange(length, device=device)
        if may_cache(device):
            _IDENTITY[key] = cached
    return cached


def _run_triton(q, k, v, block_mask, scale, order, out, *, gather_kv, config, use_tma) -> None:
    from . import attention as kernels
    batch, q_heads, q_len, head_dim = q.shape
    mask_block = block_mask.block_size
    if block_mask.kv_indices.shape[2:] == (1, 1):  # one block each side: any block size >= the lengths is
        mask_block = min(mask_block, -(-max(q_len, k.shape[2]) // 128) * 128)  # the same; work follows S
    gather_q = order is not None
    gather_kv = gather_q and gather_kv
    config = config or kernels.pick_config(head_dim, q.dtype, mask_block, gather_kv=gather_kv)
    if gather_q and not gather_kv:
        from .permute import gather_rows

        k, v = gather_rows(order, k, v)
    counts = block_mask.kv_counts.contiguous()
    indices = block_mask.kv_indices.contiguous()
    if use_tma is None:
        use_tma = not (gather_q and gather_kv) and _tma_usable(q, k, v, out)
    tma_q, tma_kv = use_tma and not gather_q, use_tma and not gather_kv
    descs = [None] * 4
    if tma_q or tma_kv:
        from triton.tools.tensor_descriptor import TensorDescriptor

        descs = [
            TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, head_dim])
            for x, rows in ((q, config.block_m), (k, config.block_n), (v, config.block_n), (out, config.block_m))
        ]
    grid = (math.ceil(q_len / config.block_m), batch * q_heads)
    kernels.block_sparse_attention_fwd[grid](
        q, k, v, out, counts, indices, counts if order is None else order, *descs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_heads, q_len, k.shape[2], indices.shape[2], indices.shape[3], scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        GROUP=q_heads // k.shape[1],
        MASK_BLOCK=mask_block,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=max(16, _next_power_of_2(head_dim)),
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        TMA_Q=tma_q,
        TMA_KV=tma_kv,
        GATHER_Q=gather_q,
        GATHER_KV=gather_kv,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _tma_usable(*tensors) -> bool:
    """TMA needs a Hopper-or-newer GPU, a power-of-two head dim, unit last stride, 16-byte aligned rest."""
    q = tensors[0]
    if interpreting() or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    head_dim, size = q.shape[-1], q.element_size()
    if head_dim != _next_power_of_2(head_dim) or head_dim < 16:
        return False
    try:
        importlib.import_module("triton.tools.tensor_descriptor")
    except ImportError:
        return False
    return all(
        x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-1])
        for x in tensors
    )


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
