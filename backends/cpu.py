"""The ``cpu`` backend: the C++17 block-sparse flash-attention kernel in ``csrc/``.

float32 and float64 run natively; float16 and bfloat16 are read as they are and
computed in float32: the kernel converts K and V as it packs them into tiles, q as
it loads a block of rows and the output as it stores it, so no float32 copy of a
whole tensor is made. Inputs may be strided views (BSND): the
kernel reads them through their strides, without copies. One build serves every
CPU: the kernel's instruction set (AVX-512, AVX2, generic) is chosen at run time,
or forced with ``RAINFUSION_CPU_ISA``.
"""
from __future__ import annotations

import importlib
import os

import torch

from rainfusion_core.backend import Backend
from rainfusion_core.dtypes import accumulation_dtype

_NATIVE = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def _load_kernel():
    try:
        return importlib.import_module("rainfusion_core._cpu_kernel"), None
    except ImportError as exc:
        return None, (
            f"the C++ extension rainfusion_core._cpu_kernel is not built ({exc}); reinstall with a C++17 "
            "compiler and pybind11 present (pip install -e .) to build it"
        )


#: Forces one instruction-set path of the kernel ("avx512", "avx2" or "generic"); unset: the fastest
#: this CPU runs. For tests and benchmarks of the slower paths.
ISA_VARIABLE = "RAINFUSION_CPU_ISA"


def requested_isa() -> str:
    return os.environ.get(ISA_VARIABLE, "").strip().lower()


def kernel_description() -> str:
    """What the kernel runs with, e.g. ``"AVX2 + FMA, OpenMP, 2 threads"``; why not, when it is not built."""
    kernel, reason = _load_kernel()
    if kernel is None:
        return f"not built: {reason}"
    try:
        isa = kernel.isa_description(requested_isa())
    except ValueError as exc:
        return f"{ISA_VARIABLE}: {exc}"
    threads = f"OpenMP, {torch.get_num_threads()} threads" if kernel.has_openmp() else "no OpenMP, 1 thread"
    return f"{isa}, {threads}"


class CpuBackend(Backend):
    """Block-sparse flash attention in C++ with OpenMP; the fast path on machines without an accelerator."""

    name = "cpu"
    device_types = ("cpu",)
    priority = 10
    dtypes = _HALF + _NATIVE
    returns_lse = True

    def unavailable_reason(self):
        return _load_kernel()[1]

    def forward(self, q, k, v, block_mask, scale, return_lse=False):
        kernel, reason = _load_kernel()
        if kernel is None:
            raise RuntimeError(reason)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise RuntimeError("the cpu backend has no backward (an inference kernel), but q, k or v requires grad: "
                               "run it under torch.no_grad() or torch.inference_mode(), or detach them")
        out = torch.empty(q.shape, dtype=q.dtype)
        isa = requested_isa()
        if isa:
            try:  # name the variable when it asks for a path that does not exist or this CPU lacks
                kernel.isa_description(isa)
            except ValueError as exc:
                raise ValueError(f"{ISA_VARIABLE}={isa!r}: {exc}") from None
        mask = (block_mask.kv_counts.contiguous().numpy(), block_mask.kv_indices.contiguous().numpy(),
                block_mask.block_size, float(scale), torch.get_num_threads(), isa)
        lse = torch.empty(q.shape[:3], dtype=accumulation_dtype(q.dtype)) if return_lse else None
        where = None if lse is None else lse.numpy()
        if q.dtype in _NATIVE:
            kernel.forward(q.numpy(), k.numpy(), v.numpy(), out.numpy(), *mask, lse=where)
        else:  # float16 / bfloat16 bits, converted by the kernel as it packs tiles: no float32 copies
            bits = [x.view(torch.int16).numpy() for x in (q, k, v, out)]
            kernel.forward_16bit(*bits, *mask, str(q.dtype).removeprefix("torch."), lse=where)
        return out if lse is None else (out, lse)
