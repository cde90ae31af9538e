"""The resolve-and-validate step: the user's arguments in, one immutable call description out.

Every public entry point calls one of these once; everything below them
(prediction, the custom ops, the registry, the backends) trusts what they return.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_block_size, check_bool, check_int, check_optional_bool, check_qkv, check_sparsity, check_tensor_layout,
    default_scale, describe,
)
from .backend import Backend
from .block_mask import num_blocks
from .crossover import dense_reason, expected_density
from .layout import VideoLayout
from .precision import DEFAULT_PRECISION, check_precision
from .registry import check_device_matches, is_automatic


@dataclass(frozen=True)
class BackendChoice:
    """``backend=`` as the call carries it.

    ``spec`` (a backend name, a device string, or ``None`` for the inputs' device)
    crosses the custom-op boundary and is resolved by the registry inside the op;
    a ``Backend`` object cannot cross it and runs eagerly (``obj``).
    """

    spec: str | None = None
    obj: Backend | None = None


def resolve_backend(backend, device: torch.device | None = None) -> BackendChoice:
    """``backend=`` checked; a device string is checked against ``device`` (the inputs') here, before any op."""
    if isinstance(backend, Backend):
        return BackendChoice(obj=backend)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be None, a name, a device string or a Backend, got {describe(backend)}")
    if device is not None and backend is not None and is_automatic(backend) and not torch.compiler.is_compiling():
        check_device_matches(backend, device)  # an absent or wrong device in one line, not from inside an op
    return BackendChoice(spec=backend)


@dataclass(frozen=True)
class MaskSpec:
    """What RainFusion2.0 mask prediction needs, resolved: the parameters of the prediction op."""

    block_size: int
    scale: float  # of the pooled scores
    keep: int  # key blocks kept per row before the forced ones
    sink_blocks: int  # first-frame blocks forced as whole rows and columns
    text_blocks: int  # text blocks forced likewise
    share_batch_mask: bool


@dataclass(frozen=True)
class SparseCall:
    """One ``sparse_attention`` / ``plan_sparse_attention`` call, validated."""

    layout: VideoLayout
    tensor_layout: str
    mask: MaskSpec
    scale: float  # softmax scale of the attention
    backend: BackendChoice
    precision: str = DEFAULT_PRECISION  # of the attention; the mask is predicted in the inputs' precision
    dense: str | None = None  # why this call runs dense attention instead (crossover.py); None: sparse


def resolve_mask_spec(q, k, layout, *, sparsity, block_size, first_frame_sink, scale,
                      share_batch_mask) -> MaskSpec:
    """Check the prediction arguments of ``q [B, Hq, S, D]``, ``k [B, Hkv, S, D]`` and resolve them."""
    _check_layout(layout)
    for name, x in (("q", q), ("k", k)):
        if x.shape[2] != layout.seq_len:
            raise ValueError(
                f"{name} sequence length ({x.shape[2]}) must equal layout.seq_len ({layout.seq_len}) for {layout}"
            )
    return _mask_spec(q, k, layout, sparsity=sparsity, block_size=block_size, first_frame_sink=first_frame_sink,
                      scale=scale, share_batch_mask=share_batch_mask)


def _check_layout(layout) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {describe(layout)}")


def _mask_spec(q, k, layout, *, sparsity, block_size, first_frame_sink, scale, share_batch_mask) -> MaskSpec:
    """The prediction parameters, for q and k already checked against ``layout``."""
    sparsity = check_sparsity(sparsity)
    block_size = check_block_size(block_size)
    keep, sink_blocks, text_blocks = mask_budget(layout, k.shape[2], sparsity, block_size, first_frame_sink)
    return MaskSpec(
        block_size=block_size,
        scale=default_scale(scale, q.shape[-1]),
        keep=keep,
        sink_blocks=sink_blocks,
        text_blocks=text_blocks,
        share_batch_mask=check_bool("share_batch_mask", share_batch_mask),
    )


def mask_budget(layout: VideoLayout, kv_len: int, sparsity: float, block_size: int,
                first_frame_sink: bool | None) -> tuple[int, int, int]:
    """``(keep, sink_blocks, text_blocks)`` of a RainFusion2.0 mask: key blocks kept per row before the
    forced ones, and the forced first-frame and text blocks (the sink is on by default for videos)."""
    if check_optional_bool("first_frame_sink", first_frame_sink) is None:
        first_frame_sink = layout.frames > 1
    return (keep_blocks(num_blocks(kv_len, block_size), sparsity),
            num_blocks(layout.frame_len, block_size) if first_frame_sink else 0,
            num_blocks(layout.text_len, block_size))


def keep_blocks(kv_blocks: int, sparsity: float) -> int:
    """Key blocks each row keeps by score at ``sparsity`` (before the forced sink and text blocks)."""
    return min(kv_blocks, max(1, math.ceil(kv_blocks * (1.0 - sparsity))))


def crossover_reason(device_type: str, layout: VideoLayout, sparsity: float, block_size: int,
                     first_frame_sink: bool | None, min_tokens: int | None) -> str | None:
    """Why a call of this grid runs dense attention on ``device_type`` (``crossover.py``); ``None``: sparse."""
    if min_tokens == 0:
        return None
    keep, sink_blocks, text_blocks = mask_budget(layout, layout.seq_len, sparsity, block_size, first_frame_sink)
    density = expected_density(layout.seq_len, block_size, keep, sink_blocks + text_blocks)
    return dense_reason(device_type, layout.video_len, density, min_tokens)


def model_order_views(q, k, v, layout, tensor_layout: str):
    """Check model-order inputs and return them as (possibly strided) ``[B, H, S, D]`` views."""
    tensor_layout = check_tensor_layout(tensor_layout)
    _check_layout(layout)
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


def resolve_sparse_call(q, k, v, layout, *, sparsity, block_size, tensor_layout, backend, scale, first_frame_sink,
                        share_batch_mask, precision=DEFAULT_PRECISION, min_tokens=0):
    """``(SparseCall, q, k, v)`` with q, k, v as ``[B, H, S, D]`` views of the model-order inputs.

    ``min_tokens``: the dense crossover (``crossover.py``): ``None`` the measured one for q's
    device, ``0`` never dense. It applies under automatic selection only (``backend`` ``None`` or
    a device string): FP8 and a backend named explicitly are asked for by name and never run dense.
    """
    q, k, v = model_order_views(q, k, v, layout, tensor_layout)
    mask = _mask_spec(q, k, layout, sparsity=sparsity, block_size=block_size,
                      first_frame_sink=first_frame_sink, scale=scale, share_batch_mask=share_batch_mask)
    precision = check_precision(precision)
    if min_tokens is not None:
        check_int("min_tokens", min_tokens, minimum=0)
    dense = None
    # FP8, and a backend named explicitly, are asked for by name: never replaced by dense attention.
    if precision == DEFAULT_PRECISION and is_automatic(backend):
        dense = crossover_reason(q.device.type, layout, sparsity, mask.block_size, first_frame_sink, min_tokens)
    call = SparseCall(layout, tensor_layout, mask, mask.scale, resolve_backend(backend, q.device),  # one scale
                      precision, dense)
    return call, q, k, v
