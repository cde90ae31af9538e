"""A strict test double of ``torch_npu`` for the ``npu`` backend's tests.

It implements ``npu_block_sparse_attention`` from the documented semantics
(torch_npu >= 2.6 op-plugin docs) and raises ``RuntimeError`` on any violated
constraint. There is no NPU here, so it computes on CPU tensors that stand
in for NPU tensors. Rows whose block keeps no key block are undefined in the
docs; the double fills them with NaN, the worst a real device could do.
"""
from __future__ import annotations

import math
import types

import torch

CALLS: list[dict] = []  # every call's keyword arguments, for tests to inspect


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"npu_block_sparse_attention: {message}")


def npu_block_sparse_attention(
    query, key, value, block_sparse_mask, block_shape, *, q_input_layout="TND", kv_input_layout="TND",
    num_key_value_heads=1, scale_value=0.0, inner_precise=1, actual_seq_lengths=None,
    actual_seq_lengths_kv=None, softmax_lse_flag=0,
):
    CALLS.append(dict(q_input_layout=q_input_layout, kv_input_layout=kv_input_layout,
                      num_key_value_heads=num_key_value_heads, scale_value=scale_value,
                      inner_precise=inner_precise, block_shape=list(block_shape),
                      actual_seq_lengths=actual_seq_lengths, actual_seq_lengths_kv=actual_seq_lengths_kv,
                      softmax_lse_flag=softmax_lse_flag))
    _require(q_input_layout in ("TND", "BNSD"), f"unknown q_input_layout {q_input_layout!r}")
    _require(q_input_layout == kv_input_layout, "q_input_layout and kv_input_layout must be equal")
    _require(query.dtype in (torch.float16, torch.bfloat16), f"dtype {query.dtype} is not supported")
    _require(key.dtype == query.dtype and value.dtype == query.dtype, "query, key, value dtypes differ")
    _require(inner_precise in (0, 1), "inner_precise must be 0 or 1")
    _require(not (query.dtype == torch.bfloat16 and inner_precise != 0), "bfloat16 requires inner_precise=0")
    _require(softmax_lse_flag in (0, 1), "softmax_lse_flag must be 0 or 1")
    _require(isinstance(scale_value, float), "scale_value must be a float")
    _require(len(block_shape) == 2 and all(isinstance(x, int) and x > 0 for x in block_shape), "bad block_shape")
    x_block, y_block = block_shape
    _require(y_block % 128 == 0, f"block_shape Y={y_block} must be a multiple of 128")
    _require(block_sparse_mask.dtype == torch.int8, "block_sparse_mask must be int8")
    _require(bool(((block_sparse_mask == 0) | (block_sparse_mask == 1)).all()), "block_sparse_mask must be 0/1")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _require(t.is_contiguous(), f"{name} must be contiguous")
    if q_input_layout == "TND":
        _require(actual_seq_lengths is not None and actual_seq_lengths_kv is not None,
                 "TND requires actual_seq_lengths and actual_seq_lengths_kv")
        raise NotImplementedError("the double implements BNSD only; the backend never uses TND")
    _require((actual_seq_lengths is None) == (actual_seq_lengths_kv is None),
             "BNSD: set both actual_seq_lengths and actual_seq_lengths_kv, or neither")
    _require(query.dim() == 4 and key.dim() == 4 and value.dim() == 4, "BNSD tensors must be 4-D")
    batch, heads, q_len, dim = query.shape
    _require(dim in (64, 128), f"head dim {dim} is not supported")
    _require(key.shape == value.shape and key.shape[0] == batch and key.shape[3] == dim, "key/value shape")
    _require(key.shape[1] == num_key_value_heads, "key heads must equal num_key_value_heads")
    _require(heads % num_key_value_heads == 0, "N must be a multiple of num_key_value_heads")
    kv_len = key.shape[2]
    expected = (batch, heads, math.ceil(q_len / x_block), math.ceil(kv_len / y_block))
    _require(tuple(block_sparse_mask.shape) == expected, f"mask shape {tuple(block_sparse_mask.shape)} != {expected}")

    group = heads // num_key_value_heads
    rows = torch.arange(q_len) // x_block
    cols = torch.arange(kv_len) // y_block
    allowed = block_sparse_mask.bool()[:, :, rows][:, :, :, cols]  # [B, N, Sq, Skv]
    k_rep = key.float().repeat_interleave(group, dim=1)
    v_rep = value.float().repeat_interleave(group, dim=1)
    scores = (query.float() @ k_rep.transpose(-1, -2)) * scale_value
    scores = scores.masked_fill(~allowed, float("-inf"))
    softmax_dtype = torch.float32 if inner_precise == 0 else torch.float16
    probs = torch.softmax(scores.to(softmax_dtype), dim=-1).float()  # NaN where a row keeps nothing
    out = (probs @ v_rep).to(query.dtype)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True) if softmax_lse_flag else torch.empty(0)
    return out, lse


def make_module(available: bool = True) -> types.ModuleType:
    module = types.ModuleType("torch_npu")
    module.__version__ = "2.6.0.double"
    module.npu_block_sparse_attention = npu_block_sparse_attention
    module.npu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: int(available))
    return module
