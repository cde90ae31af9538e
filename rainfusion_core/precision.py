"""Compute precisions: one table, the only place a precision is described.

``precision="bf16"`` (the default) computes in the inputs' own precision: no
quantisation. ``precision="fp8"`` rounds the operands of both matrix products to
float8 e4m3 with the recipe of ``rainfusion_core.fp8``.

:data:`TABLE` holds each precision's name (the ``precision=`` argument and the CLI
choice), its help text, what it needs, the module of its rounding recipe (the operand
dtype and the low-precision reference) and its rows in the quality evaluator. Nothing
else in the library compares precision names; adding a precision is a row here, its
recipe module and the kernels that implement it (docs/design.md, *Precision*).
This module imports nothing heavy: the CLI's help lists the table without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

DEFAULT_PRECISION = "bf16"


@dataclass(frozen=True)
class Precision:
    """One compute precision: everything the library says or does about it."""

    name: str  #: the ``precision=`` value and the CLI choice
    help: str  #: what it does, in the CLI's words
    #: the module (under ``rainfusion_core``) of its rounding recipe: ``OPERAND_DTYPE``, what the kernels
    #: round both products' operands to, and ``reference_attention``; ``None``: no rounding
    recipe: str | None = None
    #: said first when no backend can run a call in it; ``None``: every backend offers it
    needs: str | None = None
    #: the quality evaluator's rows for it: ``(with rainfusion's mask, with every block kept)``
    evaluator_rows: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_PRECISION

    @property
    def reference(self) -> Callable | None:
        """``reference(q, k, v, block_mask, scale)``: the low-precision run the conformance kit judges a
        backend against and the evaluator falls back to; ``None``: the torch backend in the inputs' dtype."""
        return None if self.recipe is None else self._recipe().reference_attention

    @property
    def operand_dtype(self):
        """The torch dtype the kernels round both products' operands to; ``None``: the inputs' own."""
        return None if self.recipe is None else self._recipe().OPERAND_DTYPE

    def _recipe(self):
        return importlib.import_module(f"{__package__}.{self.recipe}")

    def backend_keywords(self) -> dict:
        """How it reaches a backend's methods: a non-default precision as the keyword ``precision=``,
        the default as nothing, so backends written before precisions existed are called as before."""
        return {} if self.is_default else {"precision": self.name}


TABLE: dict[str, Precision] = {
    p.name: p for p in (
        Precision("bf16", "the inputs' own precision (float16, bfloat16 or float32), no quantisation"),
        Precision("fp8", "both products on float8 e4m3 operands, float32 accumulation (needs an NVIDIA Hopper GPU)",
                  recipe="fp8",
                  needs="FP8 needs an NVIDIA Hopper GPU (sm_90) with the triton backend, float16 or bfloat16 "
                        "inputs, head dim 64 or 128 and 128-token blocks",
                  evaluator_rows=("fp8", "fp8_dense")),
    )
}
#: the precision names, default first
PRECISIONS = tuple(TABLE)


def check_precision(precision) -> str:
    """``precision`` if it names a row of :data:`TABLE`; else an error naming the argument."""
    if not isinstance(precision, str) or precision not in TABLE:
        shown = repr(precision) if isinstance(precision, str) else f"a {type(precision).__name__}"
        raise ValueError(f"precision must be one of {PRECISIONS}, got {shown}")
    return precision


def get_precision(precision: str) -> Precision:
    """The row of :data:`TABLE` for a checked precision name."""
    return TABLE[check_precision(precision)]


def backend_keywords(precision: str) -> dict:
    """:meth:`Precision.backend_keywords` of a precision name."""
    return get_precision(precision).backend_keywords()
