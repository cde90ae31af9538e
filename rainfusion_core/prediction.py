"""RainFusion2.0 block-mask prediction from block-mean queries and keys."""
from __future__ import annotations

import math

import torch

from ._checks import check_block_size, check_qkv, check_sparsity, default_scale, describe
from .backend import Backend
from .block_mask import BlockMask, num_blocks, trusted_mask
from .layout import VideoLayout
from .ops import predict_block_mask_op
from .registry import select_predictor
from .selection import block_means, compute_block_mask

__all__ = ["block_means", "predict_block_mask"]


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
    backend=None,
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
        backend: whose fused kernels compute the means and the per-row
            selection (a name, a device string, a ``Backend``); ``None``: the
            first available backend of q's device. Backends without fused
            prediction, and ``"torch"``, use the eager definitions of
            ``rainfusion_core.selection``; the mask is the same either way.

    Returns:
        A :class:`BlockMask` of shape ``[B, Hq, NQ, NK]``. For each row,
        ``keep = max(1, ceil(NK * (1 - sparsity)))`` blocks with the largest
        pooled softmax scores are kept (ties with the ``keep``-th score kept
        too), then text and sink rows/columns are forced on. No host
        synchronisation; one opaque op under ``torch.compile``.
    """
    return predict_mask(q, k, layout, None, sparsity=sparsity, block_size=block_size,
                        first_frame_sink=first_frame_sink, scale=scale, share_batch_mask=share_batch_mask,
                        backend=backend)


def predict_mask(q, k, layout, order, *, sparsity, block_size, first_frame_sink, scale, share_batch_mask,
                 backend) -> BlockMask:
    """:func:`predict_block_mask` of model-order q, k read through ``order`` (``None``: already permuted)."""
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

    batch, length = q.shape[0], q.shape[2]
    if share_batch_mask:
        q, k = q[:1], k[:1]
    nk = num_blocks(k.shape[2], block_size)
    params = dict(
        block_size=block_size, scale=scale, keep=min(nk, max(1, math.ceil(nk * (1.0 - sparsity)))),
        sink_blocks=num_blocks(layout.frame_len, block_size) if first_frame_sink else 0,
        text_blocks=num_blocks(layout.text_len, block_size),
    )
    if isinstance(backend, Backend):  # an object cannot cross the op boundary: run eagerly
        fused = select_predictor(backend, q)
        dense, counts, indices = compute_block_mask(q, k, order, fused=fused, **params)
    else:
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be None, a name, a device string or a Backend, got {describe(backend)}")
        dense, counts, indices = predict_block_mask_op(q, k, order, backend=backend, **params)
    if share_batch_mask:
        dense, counts, indices = (x.expand(batch, *x.shape[1:]) for x in (dense, counts, indices))
    return trusted_mask(dense, counts, indices, block_size, length, length)
