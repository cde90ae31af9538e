"""An out-of-tree backend: block-sparse attention by gathering each row's kept key blocks.

It reads the index view of the mask (``kv_counts``/``kv_indices``), as an
accelerator kernel would, and is a template for vendors: replace ``forward``
with a call into your device's kernel, declare the device types and what the
kernel computes (``dtypes``, ``head_dims``, ``block_multiple``), and refuse
what data cannot say in ``unsupported_reasons``.

Required: ``name``, ``device_types``, ``forward``. Optional, with defaults:
``priority``, ``dtypes``, ``head_dims``, ``block_multiple``, ``precisions``,
``precision_limits``, ``unavailable_reason``, ``unsupported_reasons``.
Optional capabilities, not offered here (each returns ``None`` by default):
``mask_predictor(dtype)`` to predict masks on your kernels, and
``model_order_attention()`` to read q/k/v through the permutation instead of
receiving permuted copies (see ``rainfusion_core.Backend``).
"""
from __future__ import annotations

import torch

import rainfusion_core as rf
from rainfusion_core.dtypes import accumulation_dtype


class BlockwiseBackend(rf.Backend):
    name = "example_blockwise"
    device_types = ("cpu",)
    priority = -10  # never preferred over the built-ins; name it to use it
    dtypes = (torch.bfloat16, torch.float32, torch.float64)  # no float16: a template's limit, declared as data
    # head_dims: not declared, it computes any (an accelerator would list its own, e.g. (64, 128))

    def forward(self, q, k, v, block_mask, scale):
        batch, q_heads, q_len, _ = q.shape
        group = q_heads // k.shape[1]
        bs = block_mask.block_size
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        counts = block_mask.kv_counts.tolist()  # one host copy; fine on a CPU backend
        offsets = torch.arange(bs, device=q.device)
        acc = accumulation_dtype(q.dtype)
        for b in range(batch):
            for h in range(q_heads):
                for i, count in enumerate(counts[b][h]):
                    if count == 0:
                        continue  # a row with no kept block stays zero
                    blocks = block_mask.kv_indices[b, h, i, :count].long()
                    keys = (blocks[:, None] * bs + offsets).flatten()
                    keys = keys[keys < k.shape[2]]
                    rows = slice(i * bs, min(q_len, (i + 1) * bs))
                    scores = (q[b, h, rows].to(acc) @ k[b, h // group, keys].to(acc).T) * scale
                    probs = torch.softmax(scores, dim=-1)
                    out[b, h, rows] = (probs @ v[b, h // group, keys].to(acc)).to(q.dtype)
        return out
