"""Exact merging of attention computed over disjoint sets of keys.

Attention of a row over keys ``K = K_1 ∪ ... ∪ K_n`` (disjoint) is a weighted mean of the
attention over each part: with ``lse_i`` the log-sum-exp of the row's scaled scores over
``K_i``, ``lse = log Σ exp(lse_i)`` and ``out = Σ exp(lse_i − lse) · out_i``. This is what
ring attention does with the partial results of each key shard; every backend with
``returns_lse`` gives the ``(out, lse)`` pairs (``block_sparse_attention(...,
return_lse=True)``). A part in which a row keeps no key (``lse_i = −inf``, ``out_i = 0``)
adds nothing; a row with no key in any part stays zero with ``lse = −inf``.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor_layout


def merge_attention(outs, lses, *, tensor_layout: str = "BNSD") -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention over the union of the key sets of the parts ``(outs[i], lses[i])``.

    ``outs``: tensors ``[B, H, S, D]`` (``"BNSD"``) or ``[B, S, H, D]`` (``"BSND"``), one per part,
    of one shape and dtype; ``lses``: ``[B, H, S]`` each, float. Parts are added in the order
    given, so the result does not depend on timing. The merge runs in float32 (float64 when
    an lse is float64); ``out`` comes back in the parts' dtype, ``lse`` in float32 (float64).
    """
    tensor_layout = check_tensor_layout(tensor_layout)
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per output and at least one part, got {len(outs)} outputs "
                         f"and {len(lses)} lses")
    shape, dtype = outs[0].shape, outs[0].dtype
    rows = (shape[0], shape[1], shape[2]) if tensor_layout == "BNSD" else (shape[0], shape[2], shape[1])
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"outs[{i}] is a {out.dtype} tensor of shape {tuple(out.shape)}; expected {dtype} "
                             f"{tuple(shape)} like outs[0]")
        if tuple(lse.shape) != rows or not lse.is_floating_point():
            raise ValueError(f"lses[{i}] has shape {tuple(lse.shape)}; expected a float tensor of shape {rows} "
                             f"([B, H, S] for {tensor_layout} outputs of shape {tuple(shape)})")
    work = torch.float64 if any(lse.dtype == torch.float64 for lse in lses) else torch.float32
    stacked = torch.stack([lse.to(work) for lse in lses])  # [n, B, H, S]
    total = torch.logsumexp(stacked, dim=0)
    # rows with no key in any part (-inf - -inf) weigh nothing; a NaN lse stays NaN and poisons its row
    weights = torch.where(total == float("-inf"), 0.0, torch.exp(stacked - total))
    if tensor_layout == "BSND":
        weights = weights.transpose(2, 3)  # [n, B, S, H]
    merged = sum(w[..., None] * out.to(work) for w, out in zip(weights, outs))
    return merged.to(dtype), total
