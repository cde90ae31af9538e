"""The two device-side steps of a sparse call as ``torch.library`` custom ops.

``torch.compile`` sees ``rainfusion::predict_block_mask`` and
``rainfusion::block_sparse_attention`` as opaque nodes (each with a fake
implementation for shapes), so a compiled model that calls
``sparse_attention`` has no graph break: backend selection, fused prediction
and the kernel launch run inside the ops at run time.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backend import Backend, checked_output
from .block_mask import BlockMask, num_blocks, trusted_mask
from .registry import select_backend, select_predictor
from .selection import compute_block_mask


@torch.library.custom_op("rainfusion::predict_block_mask", mutates_args=())
def predict_block_mask_op(
    q: torch.Tensor,
    k: torch.Tensor,
    order: Optional[torch.Tensor],
    block_size: int,
    scale: float,
    keep: int,
    sink_blocks: int,
    text_blocks: int,
    backend: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = select_predictor(backend, q)
    return compute_block_mask(q, k, order, block_size=block_size, scale=scale, keep=keep,
                              sink_blocks=sink_blocks, text_blocks=text_blocks, fused=fused)


@predict_block_mask_op.register_fake
def _(q, k, order, block_size, scale, keep, sink_blocks, text_blocks, backend):
    batch, heads, length = q.shape[:3]
    blocks = num_blocks(length, block_size)
    dense = q.new_empty((batch, heads, blocks, blocks), dtype=torch.bool)
    counts = q.new_empty((batch, heads, blocks), dtype=torch.int32)
    return dense, counts, q.new_empty((batch, heads, blocks, blocks), dtype=torch.int32)


@torch.library.custom_op("rainfusion::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    backend: Optional[str],
    order: Optional[torch.Tensor] = None,
    bsnd_out: bool = False,
) -> torch.Tensor:
    """``[B, Hq, Sq, D]`` attention; with ``order`` the tensors are in model order (see Backend.forward_reordered).

    The result is contiguous: ``[B, Hq, Sq, D]``, or ``[B, Sq, Hq, D]`` with ``bsnd_out``.
    """
    mask = trusted_mask(dense, kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    return attend(select_backend(backend, q, k, v, mask), q, k, v, mask, scale, order, bsnd_out)


def attend(chosen: Backend, q, k, v, mask: BlockMask, scale: float, order=None, bsnd_out: bool = False) -> torch.Tensor:
    """Run ``chosen`` into a contiguous output, ``[B, Hq, Sq, D]`` or ``[B, Sq, Hq, D]`` with ``bsnd_out``.

    With ``order`` the inputs are in model order (``Backend.forward_reordered``).
    The op's body, and the eager path for a ``Backend`` object that cannot cross it.
    """
    if order is None and not bsnd_out:
        return checked_output(chosen, chosen.forward(q, k, v, mask, scale), q).contiguous()
    out = _empty_out(q, bsnd_out)
    view = out.transpose(1, 2) if bsnd_out else out
    if order is None:
        view.copy_(checked_output(chosen, chosen.forward(q, k, v, mask, scale), q))
    else:
        chosen.forward_reordered(q, k, v, mask, scale, order, view)
    return out


def _empty_out(q: torch.Tensor, bsnd_out: bool) -> torch.Tensor:
    batch, heads, length, dim = q.shape
    shape = (batch, length, heads, dim) if bsnd_out else (batch, heads, length, dim)
    return q.new_empty(shape)


@block_sparse_attention_op.register_fake
def _(q, k, v, dense, kv_counts, kv_indices, block_size, scale, backend, order=None, bsnd_out=False):
    return _empty_out(q, bsnd_out)
