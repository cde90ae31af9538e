"""The ``Backend`` base class: what a kernel provider implements."""
from __future__ import annotations

import torch

from ._checks import describe
from .block_mask import BlockMask
from .errors import BackendError


class Backend:
    """A way to run block-sparse attention on some devices.

    Subclasses set three class attributes and override what they need:

    * ``name`` -- unique registry key (``"triton"``, ``"cpu"``, ``"my_asic"``).
    * ``device_types`` -- torch device types it runs on, e.g. ``("cuda",)``;
      ``("*",)`` means any device.
    * ``priority`` -- higher wins when several backends fit one device.
    * ``head_dims`` (optional) -- the head dims to prove in the conformance kit.

    Defaults: available, refuses nothing; only :meth:`forward` must be written.

    Methods:

    * :meth:`unavailable_reason` -- ``None`` when the backend can run on this
      machine, else a sentence saying why not (package missing, no device,
      extension not built). Called lazily, never at import.
    * :meth:`unsupported_reasons` -- sentences for every property of a call
      the backend cannot handle (dtype, head dim, block size, GQA ratio);
      empty when it can.
    * :meth:`forward` -- the computation, on tensors already in permuted order.
    * :meth:`forward_reordered` (optional) -- the same on tensors left in the
      model's order plus the permutation; the default gathers copies and
      calls :meth:`forward`, a backend may read through the permutation instead.
    * :meth:`block_means` and :meth:`select_blocks` (optional) -- the two heavy
      steps of mask prediction, for backends that set ``fused_prediction_dtypes``;
      they must give what ``rainfusion_core.prediction``'s reference gives.

    ``forward`` contract: ``q`` is ``[B, Hq, Sq, D]``, ``k`` and ``v`` are
    ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (query head ``h`` reads key head
    ``h // (Hq // Hkv)``); all three may be strided views (for instance a
    ``[B, S, H, D]`` tensor transposed). ``block_mask`` has shape
    ``[B, Hq, NQ, NK]``. Return ``[B, Hq, Sq, D]`` in ``q.dtype`` where row
    ``t`` is ``softmax(scale * q_t k_j^T) v_j`` over the key tokens ``j`` of the
    kept blocks of ``t``'s query block, and zeros for a row with no kept block.
    """

    name: str = ""
    device_types: tuple[str, ...] = ()
    priority: int = 0
    #: head dims the conformance kit tests (``rainfusion_core.testing``); ``None``: 32, 64 and 128
    head_dims: tuple[int, ...] | None = None
    #: input dtypes for which :meth:`block_means` / :meth:`select_blocks` are implemented
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
        raise NotImplementedError(f"backend {self.name!r} does not implement forward()")

    def forward_reordered(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
        order: torch.Tensor, out: torch.Tensor,
    ) -> None:
        """:meth:`forward` on tensors in the model's order, written into ``out``.

        ``order`` is the int64 ``[S]`` permutation of the mask (``permuted[i] =
        original[order[i]]``); q, k, v and ``out`` (``[B, Hq, Sq, D]``, maybe a
        strided view) are in the original order. Default: gather permuted
        copies, run :meth:`forward`, scatter its rows back.
        """
        permuted = [x.index_select(2, order) for x in (q, k, v)]
        out.index_copy_(2, order, checked_output(self, self.forward(*permuted, block_mask, scale), permuted[0]))

    def block_means(self, x: torch.Tensor, block_size: int, order: torch.Tensor | None) -> torch.Tensor:
        """float32 means of each ``block_size`` run of the permuted rows of ``x [B, H, S, D]``.

        Rows are read in the order ``order`` (model-order ``x``) or as they are
        (``order=None``); the last block may be partial. Returns ``[B, H, NB, D]``.
        """
        raise NotImplementedError(f"backend {self.name!r} has no fused mask prediction")

    def select_blocks(
        self, scores: torch.Tensor, *, scale: float, keep: int, sink_blocks: int, text_blocks: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mask rows of pooled float32 ``scores [B, H, NQ, NK]``: softmax, top-``keep``, forced blocks.

        Returns ``(dense, kv_counts, kv_indices)`` as :class:`BlockMask` holds
        them (see ``rainfusion_core.prediction.select_blocks`` for the definition).
        """
        raise NotImplementedError(f"backend {self.name!r} has no fused mask prediction")

    def runs_on(self, device_type: str) -> bool:
        """Whether the backend accepts tensors of ``device_type`` when named explicitly.

        Automatic selection uses ``device_types`` alone; a backend may accept
        more when asked by name (Triton's CPU interpreter, for instance).
        """
        return "*" in self.device_types or device_type in self.device_types

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} device_types={self.device_types} priority={self.priority}>"


def checked_output(backend: Backend, out, q: torch.Tensor) -> torch.Tensor:
    """``out`` if it is what :meth:`Backend.forward` must return for ``q``; else an error naming the backend."""
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype
            or out.device != q.device):
        where = f" on {out.device}" if isinstance(out, torch.Tensor) else ""
        raise BackendError(
            f"backend {backend.name!r} returned {describe(out)}{where} from forward(); expected a {q.dtype} "
            f"tensor of shape {tuple(q.shape)} on {q.device}"
        )
    return out
