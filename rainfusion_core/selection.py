"""The steps of RainFusion2.0 mask prediction, as eager reference definitions.

``mask_rule.MaskRule.predict`` runs block means -> pooled scores -> per-row selection
with these. A backend with a mask predictor (``Backend.mask_predictor``) replaces
the two heavy steps, :func:`block_means` and :func:`select_blocks`, with
kernels that must give the same result; the pooled scores are always the one
batched matmul below, so both paths rank the same numbers.
"""
from __future__ import annotations

import torch

from ._checks import describe
from .backend import MaskPredictor
from .block_mask import BlockMask
from .errors import BackendError


def block_means(x: torch.Tensor, block_size: int, dtype: torch.dtype, order: torch.Tensor | None = None):
    """Mean of each run of ``block_size`` permuted tokens of ``x [B, H, S, D]`` -> ``[B, H, ceil(S / bs), D]``.

    ``order`` (``[S]``, ``permuted[i] = x[..., order[i], :]``) reads a model-order
    ``x`` in permuted order; ``None`` takes ``x`` as it is. The last block may
    be partial and is averaged over the tokens it has. Accumulates in ``dtype``.
    """
    if order is not None:
        x = x.index_select(2, order)
    length = x.shape[2]
    full = length // block_size
    parts = []
    if full:
        parts.append(x[:, :, : full * block_size].unflatten(2, (full, block_size)).mean(dim=3, dtype=dtype))
    if length % block_size:
        parts.append(x[:, :, full * block_size :].mean(dim=2, keepdim=True, dtype=dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def pooled_scores(q_mean: torch.Tensor, k_mean: torch.Tensor) -> torch.Tensor:
    """``q̄ k̄ᵀ`` per query head: ``[B, Hq, NQ, D] x [B, Hkv, NK, D] -> [B, Hq, NQ, NK]`` (unscaled)."""
    kv_heads = k_mean.shape[1]
    grouped = q_mean.unflatten(1, (kv_heads, q_mean.shape[1] // kv_heads))  # [B, Hkv, G, NQ, D]
    return (grouped @ k_mean.unsqueeze(2).transpose(-1, -2)).flatten(1, 2)


def select_blocks(scores: torch.Tensor, *, scale: float, keep: int, sink_blocks: int, text_blocks: int):
    """The RainFusion2.0 block choice of each row of ``scores [B, H, NQ, NK]``.

    ``P = softmax(scale * scores)`` per row; a block is kept when its ``P`` is
    ``>=`` the row's ``keep``-th largest (ties keep more); a row whose scaled scores hold
    a NaN or an infinity (NaN or infinite q or k) keeps every block. Then the first
    ``sink_blocks`` and the last ``text_blocks`` blocks are kept as whole rows
    and whole columns (the last rows of ``NQ``, the last columns of ``NK``).
    Returns ``(dense, kv_counts, kv_indices)`` as :class:`~rainfusion_core.BlockMask` holds them.
    """
    scaled = scores * scale
    probs = torch.softmax(scaled, dim=-1)
    threshold = probs.topk(keep, dim=-1, sorted=True).values[..., keep - 1 :]
    # A row whose scores hold a NaN or an infinity (a NaN or infinite value in q or k) keeps every block,
    # so the attention propagates it exactly as dense attention does instead of dropping poisoned blocks.
    mask = (probs >= threshold) | ~scaled.isfinite().all(dim=-1, keepdim=True)
    nq, nk = mask.shape[-2:]
    for rows, cols in ((slice(0, sink_blocks), slice(0, sink_blocks)),
                       (slice(max(nq - text_blocks, 0), nq), slice(max(nk - text_blocks, 0), nk))):
        mask[:, :, rows, :] = True
        mask[:, :, :, cols] = True
    made = BlockMask.from_dense(mask, block_size=1, q_len=mask.shape[2], kv_len=nk)
    return made.dense, made.kv_counts, made.kv_indices


def check_predicted(predictor: MaskPredictor, parts, scores: torch.Tensor) -> None:
    """A backend's ``select_blocks`` must return both mask views with the scores' shape: else an error naming it."""
    shape = tuple(scores.shape)
    expected = (("dense", torch.bool, shape), ("kv_counts", torch.int32, shape[:3]), ("kv_indices", torch.int32, shape))
    if not isinstance(parts, tuple) or len(parts) != 3:
        raise BackendError(f"mask predictor {type(predictor).__name__} returned {type(parts).__name__} from "
                           "select_blocks(); expected (dense, kv_counts, kv_indices)")
    for (name, dtype, want), got in zip(expected, parts):
        if (not isinstance(got, torch.Tensor) or got.dtype != dtype or tuple(got.shape) != want
                or got.device != scores.device):
            raise BackendError(f"mask predictor {type(predictor).__name__} returned {name} as {describe(got)}"
                               f"{' on ' + str(got.device) if isinstance(got, torch.Tensor) else ''}; expected a "
                               f"{dtype} tensor of shape {want} on {scores.device}")
