"""Public entry points: ``block_sparse_attention`` and ``sparse_attention``."""
from __future__ import annotations

import torch

from ._checks import check_mask_matches, check_qkv, check_tensor_layout, default_scale, describe
from .block_mask import BlockMask
from .layout import VideoLayout
from .permutation import build_permutation
from .prediction import predict_block_mask
from .registry import select_backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    backend=None,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, Sq, D]`` over ``k, v [B, Hkv, Sk, D]`` on the tiles ``block_mask`` keeps.

    Inputs are in the order the mask was made for (permuted order when it
    comes from :func:`predict_block_mask`) and may be strided views.
    ``backend``: ``None`` (best for q's device), a device string
    (``"cuda:0"``), a backend name (``"triton"``), or a ``Backend``.
    Returns ``[B, Hq, Sq, D]`` in ``q.dtype``; rows with no kept block are zero.
    """
    check_qkv(q, k, v)
    check_mask_matches(q, k, block_mask)
    scale = default_scale(scale, q.shape[-1])
    chosen = select_backend(backend, q, k, v, block_mask)
    return chosen.forward(q, k, v, block_mask, scale)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    *,
    sparsity: float = 0.8,
    block_size: int = 128,
    tensor_layout: str = "BNSD",
    backend=None,
    scale: float | None = None,
    first_frame_sink: bool | None = None,
    share_batch_mask: bool = False,
) -> torch.Tensor:
    """RainFusion2.0 self-attention of a video sequence in the model's token order.

    Permutes q, k, v into 8x8 spatial tiles (text last), predicts the block
    mask from block means, runs the block-sparse kernel and restores the
    original token order. ``tensor_layout`` is ``"BNSD"`` (``[B, H, S, D]``)
    or ``"BSND"`` (``[B, S, H, D]``); the output has q's shape and layout.
    """
    tensor_layout = check_tensor_layout(tensor_layout)
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {describe(layout)}")
    seq_dim = 2 if tensor_layout == "BNSD" else 1
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor in {tensor_layout} layout, got {describe(x)}")
        if x.shape[seq_dim] != layout.seq_len:
            raise ValueError(
                f"{name} has {x.shape[seq_dim]} tokens on its sequence dim {seq_dim} ({tensor_layout}), "
                f"but layout.seq_len is {layout.seq_len} for {layout}"
            )
    if tensor_layout == "BSND":  # strided [B, H, S, D] views, no copies
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    check_qkv(q, k, v)

    perm = build_permutation(layout, q.device)
    q_p, k_p, v_p = perm.apply(q, 2), perm.apply(k, 2), perm.apply(v, 2)
    mask = predict_block_mask(
        q_p, k_p, layout, sparsity=sparsity, block_size=block_size,
        first_frame_sink=first_frame_sink, scale=scale, share_batch_mask=share_batch_mask,
    )
    out_p = block_sparse_attention(q_p, k_p, v_p, mask, scale=scale, backend=backend)
    if tensor_layout == "BSND":
        return perm.undo(out_p.transpose(1, 2), 1)
    return perm.undo(out_p, 2)
