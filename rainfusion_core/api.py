"""Public entry points: ``block_sparse_attention``, ``sparse_attention`` and the plan/run pair."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_qkv, check_tensor_layout, default_scale, describe
from .backend import Backend
from .block_mask import BlockMask, check_mask_matches
from .layout import VideoLayout
from .ops import attend, block_sparse_attention_op
from .permutation import Permutation, build_permutation, cached_permutation
from .prediction import predict_mask
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
    if isinstance(backend, Backend):  # an object cannot cross the op boundary: call it directly (eager)
        return attend(select_backend(backend, q, k, v, block_mask), q, k, v, block_mask, scale)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be None, a name, a device string or a Backend, got {describe(backend)}")
    return block_sparse_attention_op(
        q, k, v, block_mask.dense, block_mask.kv_counts, block_mask.kv_indices, block_mask.block_size, scale, backend
    )


@dataclass(frozen=True, eq=False)
class SparseAttentionPlan:
    """A predicted block mask with the permutation it belongs to, reusable across calls.

    Made by :func:`plan_sparse_attention`; :meth:`run` attends any q, k, v of
    the same layout (other layers, later denoising steps) without permuting
    for prediction or predicting again.

    Attributes:
        layout: the token grid.
        permutation: its cached rf_v2 permutation.
        block_mask: the mask, in permuted order, ``[B, Hq, NQ, NK]``.
        tensor_layout: ``"BNSD"`` or ``"BSND"`` of the tensors :meth:`run` takes.
        scale: softmax scale (``None``: ``D ** -0.5``).
        backend: backend name, device string or ``Backend`` (``None``: best for the inputs).
    """

    layout: VideoLayout
    permutation: Permutation
    block_mask: BlockMask
    tensor_layout: str = "BNSD"
    scale: float | None = None
    backend: str | Backend | None = None

    @property
    def density(self) -> float:
        return self.block_mask.density

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q, k, v (model order, ``tensor_layout``) on the planned mask; output like q."""
        q, k, v = _as_bnsd(q, k, v, self.layout, self.tensor_layout)
        return _attend(self, q, k, v)


def _as_bnsd(q, k, v, layout: VideoLayout, tensor_layout: str):
    """Validate model-order inputs and return them as (possibly strided) [B, H, S, D] views."""
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
    return q, k, v


def _attend(plan: SparseAttentionPlan, q, k, v) -> torch.Tensor:
    """Attention of model-order ``[B, H, S, D]`` views on the plan's mask; output in ``plan.tensor_layout``.

    The permutation travels with the tensors (``Backend.forward_reordered``):
    backends that read through it never materialise permuted copies.
    """
    mask = plan.block_mask
    check_mask_matches(q, k, mask)
    scale = default_scale(plan.scale, q.shape[-1])
    order, bsnd = plan.permutation.indices, plan.tensor_layout == "BSND"
    if isinstance(plan.backend, Backend):  # an object cannot cross the op boundary: call it directly (eager)
        return attend(select_backend(plan.backend, q, k, v, mask), q, k, v, mask, scale, order, bsnd)
    return block_sparse_attention_op(
        q, k, v, mask.dense, mask.kv_counts, mask.kv_indices, mask.block_size, scale, plan.backend, order, bsnd
    )


def _plan(q, k, layout, sparsity, block_size, tensor_layout, backend, scale, first_frame_sink, share_batch_mask,
          perm: Permutation):
    mask = predict_mask(
        q, k, layout, perm.indices, sparsity=sparsity, block_size=block_size, first_frame_sink=first_frame_sink,
        scale=scale, share_batch_mask=share_batch_mask, backend=backend,
    )
    return SparseAttentionPlan(layout, perm, mask, tensor_layout, scale, backend)


def plan_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    *,
    sparsity: float = 0.8,
    block_size: int = 128,
    tensor_layout: str = "BNSD",
    backend: str | None = None,
    scale: float | None = None,
    first_frame_sink: bool | None = None,
    share_batch_mask: bool = False,
) -> SparseAttentionPlan:
    """Predict the RainFusion2.0 mask of q, k (model order) once, for :meth:`SparseAttentionPlan.run`."""
    q, k, _ = _as_bnsd(q, k, k, layout, tensor_layout)
    return _plan(q, k, layout, sparsity, block_size, tensor_layout, backend, scale, first_frame_sink,
                 share_batch_mask, build_permutation(layout, q.device))  # the plan's own copy: it is public


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
    Equivalent to ``plan_sparse_attention(q, k, layout, ...).run(q, k, v)``.
    Backends that read through the permutation (``triton``) never copy q, k,
    v into permuted order; the others get gathered copies.
    """
    q, k, v = _as_bnsd(q, k, v, layout, tensor_layout)
    plan = _plan(q, k, layout, sparsity, block_size, tensor_layout, backend, scale, first_frame_sink,
                 share_batch_mask, cached_permutation(layout, q.device))  # never leaves this call
    return _attend(plan, q, k, v)
