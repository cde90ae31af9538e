"""Public entry points: ``block_sparse_attention``, ``sparse_attention`` and the plan/run pair.

Each resolves and checks its arguments once (``call``) and then walks down:
prediction and attention (``ops``), which choose the backend (``registry``)
and run it (``backends``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from ._checks import check_bool, check_qkv, default_scale
from .backend import Backend
from .block_mask import BlockMask, check_mask_matches
from .call import SparseCall, model_order_views, resolve_backend, resolve_sparse_call
from .layout import VideoLayout
from .ops import attention, dense_attention, predict, sparse_call
from .permutation import Permutation, build_permutation
from .precision import check_precision
from .registry import generation


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    backend=None,
    precision: str = "bf16",
    return_lse: bool = False,
):
    """Attention of ``q [B, Hq, Sq, D]`` over ``k, v [B, Hkv, Sk, D]`` on the tiles ``block_mask`` keeps.

    Inputs are in the order the mask was made for (permuted order when it
    comes from :func:`predict_block_mask`) and may be strided views.
    ``backend``: ``None`` (best for q's device), a device string
    (``"cuda:0"``), a backend name (``"triton"``), or a ``Backend``.
    ``precision``: ``"bf16"`` (the inputs' own precision) or ``"fp8"`` (operands rounded
    to float8 with the recipe of ``rainfusion_core.fp8``; a backend that cannot is an error, never a fallback).
    Returns ``[B, Hq, Sq, D]`` in ``q.dtype``; rows with no kept block are zero.
    ``return_lse=True`` returns ``(out, lse)``: ``lse [B, Hq, Sq]`` (float32; float64 for float64
    inputs) is the natural log-sum-exp of each row's scaled scores over its kept keys, ``-inf``
    for a row with none, so partial results over disjoint keys merge exactly
    (:func:`rainfusion_core.merge.merge_attention`). Only backends with ``returns_lse`` run it.
    """
    check_qkv(q, k, v)
    check_mask_matches(q, k, block_mask)
    return attention(resolve_backend(backend, q.device), q, k, v, block_mask, default_scale(scale, q.shape[-1]),
                     precision=check_precision(precision), return_lse=check_bool("return_lse", return_lse))


@dataclass(frozen=True, eq=False)
class SparseAttentionPlan:
    """A predicted block mask with the permutation it belongs to, reusable across calls.

    Made by :func:`plan_sparse_attention`; :meth:`run` attends any q, k, v of
    the same layout (other layers, later denoising steps) without permuting
    for prediction or predicting again.

    Attributes:
        layout: the token grid.
        permutation: its rf_v2 permutation (the plan's own copy).
        block_mask: the mask, in permuted order, ``[B, Hq, NQ, NK]``.
        tensor_layout: ``"BNSD"`` or ``"BSND"`` of the tensors :meth:`run` takes.
        scale: softmax scale (``None``: ``D ** -0.5``).
        backend: backend name, device string or ``Backend`` (``None``: best for the inputs).
        precision: ``"bf16"`` or ``"fp8"`` for the attention (the mask does not depend on it).
    """

    layout: VideoLayout
    permutation: Permutation
    block_mask: BlockMask
    tensor_layout: str = "BNSD"
    scale: float | None = None
    backend: str | Backend | None = None
    precision: str = "bf16"
    _chosen: dict = field(default_factory=dict, repr=False, compare=False)  # class of inputs -> backend

    @property
    def density(self) -> float:
        return self.block_mask.density

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q, k, v (model order, ``tensor_layout``) on the planned mask; output like q.

        The backend is chosen once per class of inputs (dtype, device, shapes, strides) and reused
        by later runs until the registry changes.
        """
        q, k, v = model_order_views(q, k, v, self.layout, self.tensor_layout)
        check_mask_matches(q, k, self.block_mask)
        scale = default_scale(self.scale, q.shape[-1])
        choice = resolve_backend(self.backend, q.device)
        precision = check_precision(self.precision)
        key = (generation(), q.dtype, q.device, q.shape, k.shape, q.stride(), k.stride(), v.stride())
        chosen = self._chosen.get(key)
        return attention(choice, q, k, v, self.block_mask, scale, self.permutation.indices,
                         self.tensor_layout == "BSND", precision, chosen=chosen,
                         chose=None if chosen is not None else partial(self._remember, key))

    def _remember(self, key, backend: Backend) -> None:
        if len(self._chosen) >= 8:
            self._chosen.clear()
        self._chosen[key] = backend


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
    precision: str = "bf16",
) -> SparseAttentionPlan:
    """Predict the RainFusion2.0 mask of q, k (model order) once, for :meth:`SparseAttentionPlan.run`."""
    call, q, k, _ = resolve_sparse_call(q, k, k, layout, sparsity=sparsity, block_size=block_size,
                                        tensor_layout=tensor_layout, backend=backend, scale=scale,
                                        first_frame_sink=first_frame_sink, share_batch_mask=share_batch_mask,
                                        precision=precision)
    perm = build_permutation(layout, q.device)  # the plan's own copy: it is public
    mask = predict(call.backend, q, k, perm.indices, call.mask, call.precision)
    return SparseAttentionPlan(layout, perm, mask, tensor_layout, scale, backend, call.precision)


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
    precision: str = "bf16",
    min_tokens: int | None = None,
    return_lse: bool = False,
):
    """RainFusion2.0 self-attention of a video sequence in the model's token order.

    Permutes q, k, v into 8x8 spatial tiles (text last), predicts the block
    mask from block means, runs the block-sparse kernel and restores the
    original token order. ``tensor_layout`` is ``"BNSD"`` (``[B, H, S, D]``)
    or ``"BSND"`` (``[B, S, H, D]``); the output has q's shape and layout.
    Equivalent to ``plan_sparse_attention(q, k, layout, ...).run(q, k, v)``.
    Backends that read through the permutation (``triton``) never copy q, k,
    v into permuted order; the others get gathered copies.
    ``precision="fp8"`` runs the attention with float8 operands (``rainfusion_core.fp8``)
    where the chosen backend offers it (the ``triton`` backend on Hopper GPUs) and raises
    elsewhere; the mask is predicted from the unquantised q and k either way.

    Below the measured crossover (``rainfusion_core.crossover``: too few latent tokens for
    the device, or a mask that would keep nearly every tile) the call runs dense attention
    (``torch.nn.functional.scaled_dot_product_attention``) instead, because it is faster
    there. ``min_tokens``: ``None`` uses the measured crossover of q's device (or
    ``$RAINFUSION_MIN_TOKENS``); a number replaces its token count; ``0`` always runs sparse.
    The rule is part of automatic selection: a backend named explicitly, and FP8, always run.

    ``return_lse=True`` returns ``(out, lse)``, ``lse [B, H, S]`` each row's log-sum-exp in the
    model's token order (as :func:`block_sparse_attention` describes it); such a call always runs
    sparse, on a backend with ``returns_lse``.
    """
    call, q, k, v = resolve_sparse_call(q, k, v, layout, sparsity=sparsity, block_size=block_size,
                                        tensor_layout=tensor_layout, backend=backend, scale=scale,
                                        first_frame_sink=first_frame_sink, share_batch_mask=share_batch_mask,
                                        precision=precision, min_tokens=min_tokens, return_lse=return_lse)
    if return_lse:
        return sparse_call(call.backend, q, k, v, call.layout, call.mask, call.scale, call.tensor_layout == "BSND",
                           call.precision, return_lse=True)
    return run_sparse_call(call, q, k, v)


def run_sparse_call(call: SparseCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    on_mask=None, step_sparsity: torch.Tensor | None = None, reuse=None) -> torch.Tensor:
    """A resolved call on ``[B, H, S, D]`` views of model-order q, k, v: dense below the crossover, else sparse.

    ``on_mask(mask)`` is called with each predicted mask on eager calls (the integration's density tally).
    ``step_sparsity``: a one-element CPU tensor whose value, read when the call runs, replaces the
    call's sparsity (compiled code with a sparsity per step). ``reuse``: an ``ops.ReuseAt`` (eager)
    or its CPU tensor (compiled code), to reuse a mask of an earlier step (``ops.sparse_attention_op``).
    """
    bsnd = call.tensor_layout == "BSND"
    if call.dense is not None:
        return dense_attention(q, k, v, call.scale, bsnd)
    return sparse_call(call.backend, q, k, v, call.layout, call.mask, call.scale, bsnd, call.precision, on_mask,
                       step_sparsity, reuse)
