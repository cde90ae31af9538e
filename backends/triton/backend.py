"""The ``triton`` backend: block-sparse flash attention on NVIDIA GPUs.

With ``TRITON_INTERPRET=1`` (set before Triton is imported) the same kernel
also runs on CPU tensors through Triton's interpreter; that is how CI tests
it. The interpreter path is reachable only by naming the backend. Triton
itself is imported only when the backend runs (``launch.py`` and the kernels).
"""
from __future__ import annotations

import importlib

import torch

from rainfusion_core.backend import Backend, MaskPredictor
from rainfusion_core.fp8 import FP8_DTYPE
from rainfusion_core.limits import Limits
from rainfusion_core.precision import DEFAULT_PRECISION, get_precision

from .launch import block_sparse_attention_triton, fp8_unavailable_reason, interpreting


class TritonBackend(Backend):
    """Block-sparse flash attention in Triton: fp16/bf16 fast paths, fp32 exact (no tf32)."""

    name = "triton"
    device_types = ("cuda",)
    priority = 20
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    head_dims = range(16, 257)
    block_multiple = 16
    precisions = ("bf16", "fp8")
    # fp8 runs on the Hopper kernel only: its dtypes, head dims (hopper.attention.TUNING) and block;
    # the GPU generation and strides are the hook's (launch.fp8_unavailable_reason)
    precision_limits = {"fp8": Limits(dtypes=(torch.float16, torch.bfloat16), head_dims=(64, 128), block_sizes=(128,))}
    writes_every_row = True  # every program stores its 128 (or fewer) rows, kept blocks or none
    returns_lse = True  # both kernels, in 16 bits (FP8 is refused at selection)

    def unavailable_reason(self):
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            return f"Triton is not installed ({exc}); pip install triton"
        if not interpreting() and not torch.cuda.is_available():
            return "no CUDA device is visible to torch (set TRITON_INTERPRET=1 to run the kernel on the CPU interpreter)"
        return None

    def runs_on(self, device_type: str) -> bool:
        return device_type == "cuda" or (device_type == "cpu" and interpreting())

    def unsupported_reasons(self, q, k, v, block_mask, precision=DEFAULT_PRECISION):
        if get_precision(precision).operand_dtype == FP8_DTYPE:
            reason = fp8_unavailable_reason(q, block_mask.block_size)
            return [] if reason is None else [reason]
        return []

    def forward(self, q, k, v, block_mask, scale, precision=DEFAULT_PRECISION, return_lse=False):
        if not return_lse:
            return block_sparse_attention_triton(q, k, v, block_mask, scale, precision=precision)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        return block_sparse_attention_triton(q, k, v, block_mask, scale, precision=precision, lse=lse), lse

    def model_order_attention(self):
        return _attend_in_model_order

    def mask_predictor(self, dtype):
        return _PREDICTOR if dtype in self.dtypes else None


def _attend_in_model_order(q, k, v, block_mask, scale, order, out, precision=DEFAULT_PRECISION, lse=None) -> None:
    """The kernels read q, k, v rows through the permutation and write each output row (and its
    log-sum-exp) back through it."""
    block_sparse_attention_triton(q, k, v, block_mask, scale, order=order, out=out, precision=precision, lse=lse)


class _TritonPredictor(MaskPredictor):
    """Mask prediction on the Triton kernels of ``prediction.py`` (imported on first use)."""

    def block_means(self, x, block_size, order):
        from . import prediction

        return prediction.block_means(x, block_size, order)

    def select_blocks(self, scores, *, scale, keep, sink_blocks, text_blocks):
        from . import prediction

        return prediction.select_blocks(scores, scale=scale, keep=keep, sink_blocks=sink_blocks,
                                        text_blocks=text_blocks)


_PREDICTOR = _TritonPredictor()
