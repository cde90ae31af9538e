"""The kernel call as a ``torch.library`` custom op.

``torch.compile`` sees ``rainfusion::block_sparse_attention`` as one opaque
node (with a fake implementation for shapes), so a compiled model that calls
``sparse_attention`` has no graph break: backend selection and the kernel
launch run inside the op at run time. Backends return contiguous
``[B, Hq, Sq, D]`` tensors in ``q.dtype``, which is what the fake promises.
"""
from __future__ import annotations

from typing import Optional

import torch

from .block_mask import BlockMask
from .registry import select_backend


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
) -> torch.Tensor:
    mask = BlockMask(dense, kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    out = select_backend(backend, q, k, v, mask).forward(q, k, v, mask, scale)
    return out.contiguous()


@block_sparse_attention_op.register_fake
def _(q, k, v, dense, kv_counts, kv_indices, block_size, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
