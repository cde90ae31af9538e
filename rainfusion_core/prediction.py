"""RainFusion2.0 block-mask prediction from block-mean queries and keys."""
from __future__ import annotations

import torch

from ._checks import check_qkv
from .block_mask import BlockMask
from .call import resolve_backend, resolve_mask_rule
from .layout import VideoLayout
from .ops import predict
from .selection import block_means

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
        backend: the backend whose mask predictor computes the means and the
            per-row selection (a name, a device string, a ``Backend``), chosen by
            the same rule as for attention; ``None``: the one that would run the
            attention on q's device. Backends without a predictor, and ``"torch"``,
            use the eager definitions of ``rainfusion_core.selection``. The mask
            is the same either way up to float32 rounding: block means are summed
            in each predictor's own order, so a score within a rounding of the
            row's threshold may fall either way (on the GPU at Wan2.1-14B, 11 of
            14 million tiles).

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
    """:func:`predict_block_mask` of q, k read through ``order`` (``None``: already permuted), checked here.

    For callers that hold model-order tensors (benchmarks, tests); ``sparse_attention``
    resolves its arguments once and calls :func:`rainfusion_core.ops.predict` directly.
    """
    check_qkv(q, k, k)
    rule = resolve_mask_rule(q, k, layout, sparsity=sparsity, block_size=block_size,
                             first_frame_sink=first_frame_sink, scale=scale, share_batch_mask=share_batch_mask)
    return predict(resolve_backend(backend), q, k, order, rule)
