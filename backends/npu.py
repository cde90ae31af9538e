"""The ``npu`` backend: Huawei Ascend NPUs through ``torch_npu.npu_block_sparse_attention``.

Operator contract (torch_npu >= 2.6, op-plugin docs), and how it is met here:

* layouts "TND" or "BNSD", equal for q and kv -> BNSD always; a strided (BSND)
  view is made contiguous in BNSD on the NPU (one copy), and BNSD needs no
  ``actual_seq_lengths`` (set both or neither: neither);
* ``block_sparse_mask`` int8 0/1 ``[B, N, ceil(Sq/X), ceil(Skv/Y)]`` with
  ``block_shape = [X, Y]``, Y a multiple of 128 -> our dense mask as int8 with
  ``X = Y = block_size`` (so block sizes must be multiples of 128);
* float16 or bfloat16, all equal; head dim 64 or 128; N a multiple of
  ``num_key_value_heads`` -> refused otherwise, with the reason;
* ``inner_precise`` 0 (float32 softmax) -- required for bf16, more accurate for fp16;
* ``scale_value`` defaults to 0.0 -> always passed;
* rows whose block keeps no key block are undefined in the docs -> zeroed here.

``torch_npu`` is imported only when the backend is asked whether it is
available or runs; the operator is looked up on the module at call time.
Tensors never leave their device.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from rainfusion_core.backend import Backend


def _torch_npu():
    return importlib.import_module("torch_npu")


class NpuBackend(Backend):
    """Block-sparse attention on Ascend NPUs with torch_npu's fused operator."""

    name = "npu"
    device_types = ("npu",)
    priority = 20
    # what npu_block_sparse_attention takes
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = (64, 128)
    block_multiple = 128
    returns_lse = True

    def unavailable_reason(self):
        if importlib.util.find_spec("torch_npu") is None:
            return "torch_npu is not installed (pip install torch-npu matching your torch and CANN versions)"
        try:
            torch_npu = _torch_npu()
        except Exception as exc:  # a broken CANN install raises all sorts of errors at import
            return f"torch_npu failed to import: {type(exc).__name__}: {exc}"
        npu = getattr(torch, "npu", None) or getattr(torch_npu, "npu", None)
        if npu is None or not npu.is_available():
            return "torch_npu is installed but no Ascend NPU device is visible"
        if not hasattr(torch_npu, "npu_block_sparse_attention"):
            return "this torch_npu has no npu_block_sparse_attention (torch_npu >= 2.6 needed)"
        return None

    def forward(self, q, k, v, block_mask, scale, return_lse=False):
        op = _torch_npu().npu_block_sparse_attention
        bs = block_mask.block_size
        out, lse = op(
            q.contiguous(), k.contiguous(), v.contiguous(),
            block_mask.dense.to(torch.int8), [bs, bs],
            q_input_layout="BNSD", kv_input_layout="BNSD",
            num_key_value_heads=k.shape[1], scale_value=float(scale), inner_precise=0,
            softmax_lse_flag=int(return_lse),  # the operator's own log-sum-exp, [B, N, S, 1] float32
        )
        # Rows whose query block keeps nothing are zero (lse -inf) by our contract, whatever the operator wrote.
        has_keys = (block_mask.kv_counts > 0).repeat_interleave(bs, dim=2)[:, :, : q.shape[2]]
        out = torch.where(has_keys[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        if not return_lse:
            return out
        lse = lse.reshape(q.shape[:3]).float()
        return out, torch.where(has_keys, lse, torch.full((), float("-inf"), device=lse.device))
