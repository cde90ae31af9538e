"""The ``torch`` backend: masked attention in plain PyTorch, the semantic definition.

Runs on every device and every float dtype; in float64 it is the golden
every other backend is compared with (docs/design.md, parity rule). Query blocks
are processed in chunks so memory stays ``O(chunk x Sk)`` per head, never
``O(Sq x Sk)``.
"""
from __future__ import annotations

import torch

from rainfusion_core.backend import Backend
from rainfusion_core.block_mask import BlockMask, query_chunks
from rainfusion_core.dtypes import accumulation_dtype

#: scores materialised per chunk, in elements (B * Hq * rows * Sk); ~256 MB of float32.
CHUNK_ELEMENTS = 1 << 26


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
    *, chunk_elements: int = CHUNK_ELEMENTS, lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` with the block pattern of ``block_mask``.

    Shapes: ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` (strided views are
    fine), ``block_mask [B, Hq, NQ, NK]``; returns ``[B, Hq, Sq, D]`` in
    ``q.dtype``. Scores and the softmax run in float32 (float64 for float64
    inputs), so ``q . k`` beyond the input dtype's range stays finite, as in a
    flash kernel's float32 accumulator; ``P @ V`` runs in the input dtype. A
    query row whose block keeps no key block is zero.

    ``lse``: a ``[B, Hq, Sq]`` tensor (float32, or float64 for float64 inputs) that receives
    each row's natural log-sum-exp of its scaled scores over its kept keys (``-inf`` for a
    row with none).
    """
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    softmax_dtype = accumulation_dtype(q.dtype)
    bs = block_mask.block_size
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    q_grouped = q.unflatten(1, (kv_heads, group))  # [B, Hkv, G, Sq, D]
    k_t = k.to(softmax_dtype).unsqueeze(2).transpose(-1, -2)  # [B, Hkv, 1, D, Sk]
    # P is rounded to v's dtype, then P V runs on float32 (or wider) operands: PyTorch's CPU matmul in
    # bfloat16 lets a NaN row spill into its neighbour, which dense attention never does
    v_b = v.to(softmax_dtype).unsqueeze(2)  # [B, Hkv, 1, Sk, D]
    for start, stop in query_chunks(q_len, kv_len, batch * q_heads, bs, chunk_elements):
        # --- scores of this chunk of query rows against every key, accumulated in float32 or wider
        scores = (q_grouped[:, :, :, start:stop].to(softmax_dtype) @ k_t) * scale  # [B, Hkv, G, rows, Sk]
        keep = block_mask.token_mask(start, stop).unflatten(1, (kv_heads, group))
        scores = scores.masked_fill(~keep, float("-inf"))
        if lse is not None:
            lse[:, :, start:stop] = torch.logsumexp(scores, dim=-1).flatten(1, 2)
        # --- softmax over kept keys; rows with no kept key are zeros, not NaN
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(keep.any(dim=-1, keepdim=True), probs, 0.0)
        out[:, :, start:stop] = (probs.to(v.dtype).to(softmax_dtype) @ v_b).flatten(1, 2)
    return out


class TorchBackend(Backend):
    """Pure PyTorch masked attention on any device and dtype; the parity golden in float64."""

    name = "torch"
    device_types = ("*",)
    priority = 0
    returns_lse = True

    def forward(self, q, k, v, block_mask, scale, return_lse=False):
        if not return_lse:
            return masked_attention(q, k, v, block_mask, scale)
        lse = torch.empty(q.shape[:3], dtype=accumulation_dtype(q.dtype), device=q.device)
        return masked_attention(q, k, v, block_mask, scale, lse=lse), lse
