"""The ``Backend`` base class: what a kernel provider implements, required and optional."""
from __future__ import annotations

import abc
import warnings
from typing import Callable

import torch

from .block_mask import BlockMask


class MaskPredictor(abc.ABC):
    """The two heavy steps of mask prediction on a backend's own kernels (see :meth:`Backend.mask_predictor`).

    Both must give what the eager definitions in ``rainfusion_core.selection`` give:
    :func:`~rainfusion_core.selection.block_means` (in float32) and
    :func:`~rainfusion_core.selection.select_blocks`. The pooled scores between them are
    always the library's one batched matmul, so every predictor ranks the same numbers.
    """

    @abc.abstractmethod
    def block_means(self, x: torch.Tensor, block_size: int, order: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[B, H, NB, D]`` means of each ``block_size`` run of the rows of ``x [B, H, S, D]``,
        read in the order ``order`` (``None``: as they are); the last block may be partial."""

    @abc.abstractmethod
    def select_blocks(self, scores: torch.Tensor, *, scale: float, keep: int, sink_blocks: int,
                      text_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dense, kv_counts, kv_indices)`` of pooled float32 ``scores [B, H, NQ, NK]``: softmax,
        top-``keep`` per row, forced sink and text blocks, as :class:`BlockMask` holds them."""


#: ``run(q, k, v, block_mask, scale, order, out) -> None``: attention of model-order tensors,
#: written into ``out`` (see :meth:`Backend.model_order_attention`).
ModelOrderAttention = Callable[..., None]


class Backend:
    """A way to run block-sparse attention on some devices.

    **Required**: the class attributes ``name`` (unique registry key: lowercase
    letters, digits, ``_``), ``device_types`` (torch device types it runs on, e.g.
    ``("cuda",)``; ``("*",)`` for any) and :meth:`forward`.

    **Optional, with defaults**:

    * ``priority`` (int, default 0) -- higher wins when several backends fit one device.
    * What it computes, as data (``rainfusion_core.limits``; ``None`` means any): ``dtypes``
      (a tuple of torch dtypes), ``head_dims`` (a tuple, or a ``range``), ``block_multiple``
      (mask block sizes must be a multiple of it; default 1) and ``precision_limits``
      (``{"fp8": Limits(...)}``: what a precision narrows further). The registry refuses
      every other call with a reason naming the limit; the conformance kit tests the head
      dims 32, 64 and 128 that ``head_dims`` allows, or the ones it lists.
    * ``precisions`` -- the compute precisions it offers (default ``("bf16",)``: the
      inputs' own precision; add ``"fp8"`` for the recipe of ``rainfusion_core.fp8``).
      A call in another precision than ``"bf16"`` passes ``precision=`` as a keyword to
      ``unsupported_reasons``, ``forward`` and the model-order function; a backend that
      does not list it is never asked and never chosen for it.
    * ``returns_lse`` -- whether it can return each row's log-sum-exp beside the output
      (what merging partial results needs: ring attention, ``rainfusion_core.merge``).
    * :meth:`unavailable_reason` -- ``None`` (available) unless overridden to say why
      not (package missing, no device, extension not built). Called lazily.
    * :meth:`unsupported_reasons` -- sentences for what the data above cannot say (a GPU
      generation, a stride, a GQA ratio); asked only for calls the data allows; empty by default.

    **Optional capabilities** -- each hook returns ``None`` when the backend does not offer it:

    * :meth:`mask_predictor` -- a :class:`MaskPredictor` that runs mask prediction on
      the backend's kernels for a dtype.
    * :meth:`model_order_attention` -- a function attending tensors left in the
      model's token order, reading them through the permutation; without it the
      library gathers permuted copies, calls :meth:`forward`, and scatters the rows back.

    ``forward`` contract: ``q`` is ``[B, Hq, Sq, D]``, ``k`` and ``v`` are
    ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (query head ``h`` reads key head
    ``h // (Hq // Hkv)``), in the order the mask was made for; all three may be
    strided views (for instance a ``[B, S, H, D]`` tensor transposed). ``block_mask``
    has shape ``[B, Hq, NQ, NK]``. Return ``[B, Hq, Sq, D]`` in ``q.dtype`` on q's
    device, where row ``t`` is ``softmax(scale * q_t k_j^T) v_j`` over the key tokens
    ``j`` of the kept blocks of ``t``'s query block, and zeros for a row with no kept
    block. The library checks what ``forward`` returns and names the backend when it
    is wrong. Guard every index you load from the mask: its tensors may have been
    edited in place after its checks.

    ``unsupported_reasons`` may be asked before a mask exists (to pick the backend
    whose predictor makes it): then ``block_mask`` is a stand-in with the right
    shape, block size, lengths and device whose contents must not be read.
    """

    name: str = ""
    device_types: tuple[str, ...] = ()
    priority: int = 0
    #: dtypes of q, k and v it computes in; ``None``: every float dtype
    dtypes: tuple[torch.dtype, ...] | None = None
    #: head dims it computes (a tuple or a ``range``); ``None``: any
    head_dims: tuple[int, ...] | range | None = None
    #: mask block sizes must be a multiple of this
    block_multiple: int = 1
    #: compute precisions offered (``rainfusion_core.precision.PRECISIONS``); ``"bf16"`` always
    precisions: tuple[str, ...] = ("bf16",)
    #: what a precision other than the default narrows further: ``{name: rainfusion_core.limits.Limits}``
    precision_limits: dict = {}
    #: Whether the model-order function is known to write every output row (the built-in ones,
    #: proven by their tests). Otherwise its output is NaN-filled before it runs, so a row it
    #: leaves unwritten reads NaN, never stale memory (one fill per call).
    writes_every_row: bool = False
    #: Whether ``forward(..., return_lse=True)`` returns ``(out, lse)`` (``lse`` float ``[B, Hq, Sq]``, the
    #: natural log-sum-exp of each row's scaled scores over its kept keys, ``-inf`` for a row with none) and the
    #: model-order function takes ``lse=`` (a ``[B, Hq, Sq]`` float32 view it writes through the permutation).
    #: A call that asks for the log-sum-exp never selects a backend without it.
    returns_lse: bool = False
    #: Deprecated (one release): set :meth:`mask_predictor` instead. Dtypes for which this
    #: backend defines ``block_means(x, block_size, order)`` and ``select_blocks(scores, ...)``.
    fused_prediction_dtypes: tuple[torch.dtype, ...] = ()

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reasons(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
    ) -> list[str]:
        return []

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float
    ) -> torch.Tensor:
        raise NotImplementedError(f"backend {self.name!r} does not implement forward(), which every backend must")

    # ------------------------------------------------------------------ optional capabilities
    def mask_predictor(self, dtype: torch.dtype) -> MaskPredictor | None:
        """A :class:`MaskPredictor` for inputs of ``dtype``, or ``None``: the eager reference predicts."""
        if dtype in self.fused_prediction_dtypes:  # the deprecated spelling of this hook
            _deprecated(self, "fused_prediction_dtypes with block_means/select_blocks", "mask_predictor()")
            return _LegacyPredictor(self)
        return None

    def model_order_attention(self) -> ModelOrderAttention | None:
        """``run(q, k, v, block_mask, scale, order, out)``, or ``None``: the library gathers copies.

        ``run`` takes q, k, v and ``out`` (``[B, Hq, Sq, D]``, maybe a strided view) in
        the model's token order and ``order``, the int64 ``[S]`` permutation the mask
        was made for (``permuted[i] = original[order[i]]``); it writes into ``out``.
        """
        if type(self).forward_reordered is not Backend.forward_reordered:  # the deprecated spelling
            _deprecated(self, "forward_reordered()", "model_order_attention()")
            return self.forward_reordered
        return None

    def forward_reordered(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
        order: torch.Tensor, out: torch.Tensor,
    ) -> None:
        """Deprecated (one release): override :meth:`model_order_attention` instead.

        Attention of model-order tensors into ``out``: gathers permuted copies, runs
        :meth:`forward`, scatters its rows back.
        """
        from .ops import attend_permuted_copies  # the library's own path, as for a backend without the hook

        attend_permuted_copies(self, q, k, v, block_mask, scale, order, out)

    def runs_on(self, device_type: str) -> bool:
        """Whether the backend accepts tensors of ``device_type`` when named explicitly.

        Automatic selection uses ``device_types`` alone; a backend may accept
        more when asked by name (Triton's CPU interpreter, for instance).
        """
        return "*" in self.device_types or device_type in self.device_types

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device_types={self.device_types} priority={self.priority}>"


class _LegacyPredictor(MaskPredictor):
    """A backend's own ``block_means`` / ``select_blocks`` methods, the pre-``mask_predictor`` spelling."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def block_means(self, x, block_size, order):
        return self.backend.block_means(x, block_size, order)

    def select_blocks(self, scores, *, scale, keep, sink_blocks, text_blocks):
        return self.backend.select_blocks(scores, scale=scale, keep=keep, sink_blocks=sink_blocks,
                                          text_blocks=text_blocks)


_WARNED_DEPRECATED: set[tuple[str, str]] = set()


def _deprecated(backend: Backend, old: str, new: str) -> None:
    if (backend.name, old) not in _WARNED_DEPRECATED:
        _WARNED_DEPRECATED.add((backend.name, old))
        warnings.warn(f"backend {backend.name!r} uses {old}, deprecated: define {new} instead", DeprecationWarning,
                      stacklevel=3)
