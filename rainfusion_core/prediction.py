"""RainFusion2.0 block-mask prediction from block-mean queries and keys."""
from __future__ import annotations

import math

import torch

from ._checks import check_block_size, check_qkv, check_sparsity, default_scale, describe
from .block_mask import BlockMask, num_blocks
from .layout import VideoLayout


def block_means(x: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean of each run of ``block_size`` tokens of ``x [B, H, S, D]`` -> ``[B, H, ceil(S / bs), D]``.

    The last block may be partial and is averaged over the tokens it has.
    Works on strided views without copying ``x``; accumulates in ``dtype``.
    """
    batch, heads, length, dim = x.shape
    full = length // block_size
    parts = []
    if full:
        parts.append(x[:, :, : full * block_size].unflatten(2, (full, block_size)).mean(dim=3, dtype=dtype))
    if length % block_size:
        parts.append(x[:, :, full * block_size :].mean(dim=2, keepdim=True, dtype=dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    *,
    sparsity: float,
    block_size: int = 128,
    first_frame_sink: bool | None = None,
    scale: float | None = None,
    share_batch_mask: bool = False,
) -> BlockMask:
    """Predict which attention tiles to keep, RainFusion2.0 style.

    Args:
        q: ``[B, Hq, S, D]`` queries, already in permuted order (may be a strided view).
        k: ``[B, Hkv, S, D]`` keys, permuted likewise; ``Hq`` a multiple of ``Hkv``.
        layout: the token grid; ``S`` must equal ``layout.seq_len``.
        sparsity: target fraction of key blocks to skip per row, in ``[0, 1)``.
        block_size: tokens per block on both sides.
        first_frame_sink: force the first frame's blocks as whole rows and
            columns; ``None`` means on for videos (``frames > 1``), off for images.
        scale: softmax scale of the pooled scores; ``None`` means ``D ** -0.5``.
        share_batch_mask: use batch item 0's mask for every item (the authors'
            Ascend behaviour); by default each item gets its own.

    Returns:
        A :class:`BlockMask` of shape ``[B, Hq, NQ, NK]``. For each row,
        ``keep = max(1, ceil(NK * (1 - sparsity)))`` blocks with the largest
        pooled softmax scores are kept (ties with the ``keep``-th score kept
        too), then text and sink rows/columns are forced on. Pure tensor ops:
        no host synchronisation.
    """
    check_qkv(q, k, k)
    sparsity = check_sparsity(sparsity)
    block_size = check_block_size(block_size)
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {describe(layout)}")
    for name, x in (("q", q), ("k", k)):
        if x.shape[2] != layout.seq_len:
            raise ValueError(
                f"{name} sequence length ({x.shape[2]}) must equal layout.seq_len ({layout.seq_len}) "
                f"for {layout}"
            )
    scale = default_scale(scale, q.shape[-1])
    if first_frame_sink is None:
        first_frame_sink = layout.frames > 1

    batch, q_heads, length, _ = q.shape
    kv_heads = k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_mean = block_means(q, block_size, acc)  # [B, Hq, NQ, D]
    k_mean = block_means(k, block_size, acc)  # [B, Hkv, NK, D]
    nk = k_mean.shape[2]

    # --- pooled scores, grouped so each query head meets its own key head
    grouped = q_mean.unflatten(1, (kv_heads, q_heads // kv_heads))  # [B, Hkv, G, NQ, D]
    scores = grouped @ k_mean.unsqueeze(2).transpose(-1, -2)  # [B, Hkv, G, NQ, NK]
    probs = torch.softmax(scores.flatten(1, 2) * scale, dim=-1)  # [B, Hq, NQ, NK]

    # --- top-k per row, ties with the keep-th score kept
    keep = min(nk, max(1, math.ceil(nk * (1.0 - sparsity))))
    threshold = probs.topk(keep, dim=-1, sorted=True).values[..., keep - 1 :]
    mask = probs >= threshold

    # --- forced rows and columns (q and k share the layout, so NQ == NK):
    #     the text blocks at the end, the first-frame sink at the start
    forced = []
    if layout.text_len:
        forced.append(slice(nk - num_blocks(layout.text_len, block_size), nk))
    if first_frame_sink:
        forced.append(slice(0, num_blocks(layout.frame_len, block_size)))
    for blocks in forced:
        mask[:, :, blocks, :] = True
        mask[:, :, :, blocks] = True

    if share_batch_mask:
        mask = mask[:1].expand_as(mask)
    return BlockMask.from_dense(mask, block_size=block_size, q_len=length, kv_len=k.shape[2])
