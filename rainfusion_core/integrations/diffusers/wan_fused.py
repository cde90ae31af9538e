"""Wan's eager fast path: q/k RMS norm and rotary embedding as one Triton pass per tensor.

In eager mode diffusers runs Wan's q/k prologue as about ten elementwise
passes (the rotation in float64). When ``fuse_prologue`` allows it, a sparse
Wan self-attention layer forms q, k, v here with ``rms_norm_rope`` and sends
them to the same site as the routed processor would. Under ``torch.compile``
the default is diffusers' own prologue, which Inductor fuses by itself.
"""
from __future__ import annotations

import os

import torch

# The argument order of WanAttnProcessor.__call__ after ``attn``.
_ARGUMENTS = ("hidden_states", "encoder_hidden_states", "attention_mask", "rotary_emb")


def fused_prologue_problem(attn, hidden_states, rotary_emb, *, explicit: bool) -> str | None:
    """Why the fused q/k prologue cannot run here, or ``None`` when it can.

    Like a named Triton backend, an explicit request also runs on CPU tensors under
    ``TRITON_INTERPRET=1`` (how CI tests the kernel).
    """
    interpreting = explicit and os.environ.get("TRITON_INTERPRET") == "1"
    if not hidden_states.is_cuda and not interpreting:
        return f"hidden_states are on {hidden_states.device}, the fused prologue is a CUDA Triton kernel"
    if rotary_emb is None:
        return "the layer got no rotary embedding"
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in attn.parameters())):
        return "autograd is recording and the fused prologue has no backward (run under torch.no_grad())"
    width = attn.heads * rotary_emb[0].shape[-1]
    for name in ("norm_q", "norm_k"):
        norm = getattr(attn, name, None)
        if not isinstance(norm, torch.nn.RMSNorm) or tuple(norm.normalized_shape) != (width,):
            return f"attn.{name} is {type(norm).__name__}, not an RMSNorm across heads of width {width}"
    if rotary_emb[0].numel() != hidden_states.shape[1] * rotary_emb[0].shape[-1]:
        return f"rotary tables of shape {tuple(rotary_emb[0].shape)} are not one angle row per token"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def _rms_eps(norm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


class WanFusedPrologue:
    """A processor shortcut (see ``RainFusionAttnProcessor``): ``None`` hands the call to the routed processor."""

    def __init__(self, fuse: bool | None):
        self.fuse = fuse  # None: when it can run and the model is not being compiled; True: always
        self._tables: dict = {}  # float32 rotary tables of one transformer call, by the tables they came from
        self._call = None  # which call (CallState.calls) they belong to

    def _angle_tables(self, state, rotary_emb):
        """Float32 ``[S, D]`` cos and sin, converted once per transformer call."""
        if self._call != state.calls:
            self._tables.clear()
            self._call = state.calls
        cos, sin = rotary_emb
        key = (cos.data_ptr(), sin.data_ptr(), cos.shape)
        if key not in self._tables:
            self._tables[key] = tuple(t.reshape(-1, t.shape[-1]).float().contiguous() for t in (cos, sin))
        return self._tables[key]

    def __call__(self, processor, attn, args, kwargs):
        if self.fuse is False or (self.fuse is None and torch.compiler.is_compiling()):
            return None
        if type(processor.base).__name__ != "WanAttnProcessor":
            return None
        values = dict(zip(_ARGUMENTS, args), **kwargs)
        hidden_states, rotary_emb = values.get("hidden_states"), values.get("rotary_emb")
        if values.get("encoder_hidden_states") is not None or values.get("attention_mask") is not None:
            return None  # not a plain self-attention call: the routed processor explains
        problem = fused_prologue_problem(attn, hidden_states, rotary_emb, explicit=bool(self.fuse))
        if problem is not None:
            if self.fuse:
                raise ValueError(f"fuse_prologue=True but the fused q/k prologue cannot run: {problem}")
            return None
        from ...backends.triton.wan_prologue import rms_norm_rope

        site = processor.site
        tables = self._angle_tables(site.state, rotary_emb)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        value = value.unflatten(2, (attn.heads, -1))
        query, key = (rms_norm_rope(x, norm.weight, _rms_eps(norm, x), *tables, attn.heads)
                      for x, norm in ((query, attn.norm_q), (key, attn.norm_k)))
        call = dict(dropout_p=0.0, is_causal=False, attention_kwargs=None, parallel_config=processor._parallel_config)
        out = site.attend(query, key, value, None, None, "BSND", None, call)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
