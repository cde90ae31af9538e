"""What a backend computes, declared as data, and the refusals the registry derives from it.

A backend says which dtypes, head dims and mask block sizes it computes in the class
attributes ``dtypes``, ``head_dims`` and ``block_multiple``, and what a precision
other than the default narrows further in ``precision_limits`` (``{"fp8": Limits(...)}``).
:func:`declared_reasons` turns those declarations into the reasons a call is refused,
worded the same for every backend; ``Backend.unsupported_reasons`` is asked only for
what data cannot say (a GPU generation, a stride) and only when the data allows the call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Limits:
    """The calls a backend (or one of its precisions) computes. ``None``, or a ``block_multiple`` of 1: no limit.

    ``dtypes``: the q, k, v dtypes; ``head_dims``: a tuple of head dims or a ``range``;
    ``block_multiple``: mask block sizes must be a multiple of it; ``block_sizes``: the
    mask block sizes, when only some are computed.
    """

    dtypes: tuple[torch.dtype, ...] | None = None
    head_dims: tuple[int, ...] | range | None = None
    block_multiple: int = 1
    block_sizes: tuple[int, ...] | None = None

    def reasons(self, dtype: torch.dtype, head_dim: int, block_size: int) -> list[str]:
        """Why a call with these properties is outside the limits (empty when it is inside)."""
        reasons = []
        if self.dtypes is not None and dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} is not supported ({_names(self.dtypes)} are)")
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head dim {head_dim} is not supported ({_dims(self.head_dims)} are)")
        if block_size % self.block_multiple:
            reasons.append(f"mask block size {block_size} is not a multiple of {self.block_multiple}")
        if self.block_sizes is not None and block_size not in self.block_sizes:
            reasons.append(f"mask block size {block_size} is not supported ({_dims(self.block_sizes)} are)")
        return reasons

    def problems(self) -> list[str]:
        """What is wrong with the declaration itself (checked when a backend registers)."""
        problems = []
        if self.dtypes is not None and (not isinstance(self.dtypes, tuple) or not self.dtypes
                                        or not all(isinstance(d, torch.dtype) for d in self.dtypes)):
            problems.append(f"dtypes must be None or a non-empty tuple of torch dtypes, got {self.dtypes!r}")
        for name in ("head_dims", "block_sizes"):
            value = getattr(self, name)
            if value is None or (isinstance(value, range) and len(value) and value.start > 0):
                continue
            if (not isinstance(value, tuple) or not value
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)):
                problems.append(f"{name} must be None, a non-empty tuple of positive ints or a range of them, "
                                f"got {value!r}")
        if isinstance(self.block_multiple, bool) or not isinstance(self.block_multiple, int) or self.block_multiple < 1:
            problems.append(f"block_multiple must be a positive int, got {self.block_multiple!r}")
        return problems


def declared_limits(backend) -> Limits:
    """The limits a backend declares in its class attributes, for every precision."""
    return Limits(dtypes=backend.dtypes, head_dims=backend.head_dims, block_multiple=backend.block_multiple)


def declared_reasons(backend, q: torch.Tensor, block_size: int, precision: str) -> list[str]:
    """Why ``backend``'s declarations refuse a call with query ``q [B, H, S, D]``, mask blocks of
    ``block_size`` tokens, in ``precision`` (empty when they allow it)."""
    dtype, head_dim = q.dtype, q.shape[-1]
    reasons = declared_limits(backend).reasons(dtype, head_dim, block_size)
    narrower = (backend.precision_limits or {}).get(precision)
    if narrower is not None:
        reasons += [f"in {precision}, {r}" for r in narrower.reasons(dtype, head_dim, block_size)]
    return reasons


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _dims(values) -> str:
    if isinstance(values, range) and values.step == 1:
        return f"{values.start}..{values.stop - 1}"
    return ", ".join(map(str, values))
