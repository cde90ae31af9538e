"""The resolve-and-validate step: the user's arguments in, one immutable call description out.

Every public entry point calls one of these once; everything below them
(prediction, the custom ops, the registry, the backends) trusts what they return.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_bool, check_int, check_qkv, check_tensor_layout, describe
from .backend import Backend
from .crossover import dense_reason, expected_density
from .layout import VideoLayout
from .mask_rule import MaskRule
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
class SparseCall:
    """One ``sparse_attention`` / ``plan_sparse_attention`` call, validated."""

    layout: VideoLayout
    tensor_layout: str
    mask: MaskRule
    scale: float  # softmax scale of the attention
    backend: BackendChoice
    precision: str = DEFAULT_PRECISION  # of the attention; the mask is predicted in the inputs' precision
    dense: str | None = None  # why this call runs dense attention instead (crossover.py); None: sparse


def resolve_mask_rule(q, k, layout, *, sparsity, block_size, first_frame_sink, scale,
                      share_batch_mask) -> MaskRule:
    """Check the prediction arguments of ``q [B, Hq, S, D]``, ``k [B, Hkv, S, D]`` and resolve them."""
    _check_layout(layout)
    for name, x in (("q", q), ("k", k)):
        if x.shape[2] != layout.seq_len:
            raise ValueError(
                f"{name} sequence length ({x.shape[2]}) must equal layout.seq_len ({layout.seq_len}) for {layout}"
            )
    return MaskRule.for_layout(layout, k.shape[2], q.shape[-1], sparsity=sparsity, block_size=block_size,
                               first_frame_sink=first_frame_sink, scale=scale, share_batch_mask=share_batch_mask)


def _check_layout(layout) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {describe(layout)}")


def crossover_reason(device_type: str, layout: VideoLayout, sparsity: float, block_size: int,
                     first_frame_sink: bool | None, min_tokens: int | None) -> str | None:
    """Why a call of this grid and these mask arguments runs dense attention on ``device_type``
    (``crossover.py``); ``None``: sparse."""
    if min_tokens == 0:
        return None
    rule = MaskRule.for_layout(layout, layout.seq_len, 1, sparsity=sparsity, block_size=block_size,
                               first_frame_sink=first_frame_sink, scale=1.0)  # the scale plays no part
    return _rule_crossover_reason(device_type, layout, rule, min_tokens)


def _rule_crossover_reason(device_type: str, layout: VideoLayout, rule: MaskRule, min_tokens: int | None):
    if min_tokens == 0:
        return None
    density = expected_density(layout.seq_len, rule.block_size, rule.keep, rule.forced_blocks)
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
                        share_batch_mask, precision=DEFAULT_PRECISION, min_tokens=0, return_lse=False):
    """``(SparseCall, q, k, v)`` with q, k, v as ``[B, H, S, D]`` views of the model-order inputs.

    ``min_tokens``: the dense crossover (``crossover.py``): ``None`` the measured one for q's
    device, ``0`` never dense. It applies under automatic selection only (``backend`` ``None`` or
    a device string): FP8 and a backend named explicitly are asked for by name and never run dense;
    nor does a call that asks for the log-sum-exp (``return_lse``: dense SDPA returns none).
    """
    q, k, v = model_order_views(q, k, v, layout, tensor_layout)
    mask = MaskRule.for_layout(layout, k.shape[2], q.shape[-1], sparsity=sparsity, block_size=block_size,
                               first_frame_sink=first_frame_sink, scale=scale, share_batch_mask=share_batch_mask)
    precision = check_precision(precision)
    return_lse = check_bool("return_lse", return_lse)
    if min_tokens is not None:
        check_int("min_tokens", min_tokens, minimum=0)
    dense = None
    # FP8, and a backend named explicitly, are asked for by name: never replaced by dense attention.
    if precision == DEFAULT_PRECISION and is_automatic(backend) and not return_lse:
        dense = _rule_crossover_reason(q.device.type, layout, mask, min_tokens)
    call = SparseCall(layout, tensor_layout, mask, mask.scale, resolve_backend(backend, q.device),  # one scale
                      precision, dense)
    return call, q, k, v
