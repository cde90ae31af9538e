"""Shared test helpers: markers, q/k/v and mask factories, naive float64 definitions, tiny models.

Everything here is written independently of the library it checks.
"""
from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

from rainfusion_core import fp8
from rainfusion_core.backend import Backend
from rainfusion_core.backends.torch_backend import masked_attention

# Installed with RAINFUSION_SKIP_CPP=1 the C++ extension, and so the ``cpu`` backend, is absent on purpose.
needs_cpp = pytest.mark.skipif(os.environ.get("RAINFUSION_SKIP_CPP") == "1",
                               reason="RAINFUSION_SKIP_CPP=1: installed without the C++ extension (the cpu backend)")


def triton_device(*, module_level: bool = True) -> str:
    """Where Triton tests run: ``"cuda"`` on a GPU, ``"cpu"`` under the interpreter.

    Skips (the whole module, when called at module level) when Triton is missing,
    or when there is no GPU and ``TRITON_INTERPRET`` is not 1.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install triton)", allow_module_level=module_level)
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=module_level)
    return "cpu"


def install_npu_double(monkeypatch):
    """Stand the strict double of ``torch_npu`` (``npu_double.py``) in for the real one, for one test.

    CPU tensors stand in for NPU tensors: the ``npu`` backend takes them when named.
    """
    import importlib.machinery
    import sys

    import npu_double
    from rainfusion_core.backends.npu import NpuBackend

    module = npu_double.make_module()
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", loader=None)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.npu, raising=False)
    monkeypatch.setattr(NpuBackend, "runs_on", lambda self, device_type: device_type in ("npu", "cpu"))
    npu_double.CALLS.clear()
    return module


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
    reason="needs an NVIDIA Hopper (sm_90) GPU: the warp-specialised kernel is Gluon code for sm_90",
)


def seed_for(nodeid: str) -> int:
    """A test's random seed: different per test, the same in every run (``hash`` of a str is salted per process)."""
    return zlib.crc32(nodeid.encode())


def qkv(layout_or_len, heads=(2, 2), dim=32, *, batch=1, device="cpu", dtype=torch.float32):
    """Fresh random ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]`` for a ``VideoLayout`` or a length."""
    length = getattr(layout_or_len, "seq_len", layout_or_len)
    q = torch.randn(batch, heads[0], length, dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, heads[1], length, dim, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def naive_attention(q, k, v, dense, block_size, scale):
    """float64 masked attention, one (batch, head) at a time, the token mask built by index arithmetic."""
    q, k, v = q.double(), k.double(), v.double()
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k.shape[1]
    rows = torch.arange(q_len) // block_size
    cols = torch.arange(k.shape[2]) // block_size
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            allowed = dense[b, h].cpu()[rows][:, cols]
            scores = (q[b, h] @ k[b, h // group].T).cpu() * scale
            scores[~allowed] = float("-inf")
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[b, h] = probs @ v[b, h // group].cpu()
    return out


def random_dense(batch, heads, nq, nk, density=0.5, empty_rows=()):
    dense = torch.rand(batch, heads, nq, nk) < density
    dense[..., 0] |= torch.rand(batch, heads, nq) < 0.5  # vary row starts
    for b, h, i in empty_rows:
        dense[b, h, i] = False
    return dense


def tiny_wan(seed=0, layers=2):
    """A random-weight diffusers ``WanTransformer3DModel`` small enough for a CPU (needs diffusers): the
    tiny Wan of ``tiny_models.py`` with ``layers`` blocks."""
    from tiny_models import _wan

    return _wan("WanTransformer3DModel", num_layers=layers)(seed)


def wan_inputs(grid, batch=1):
    """Latents ``[B, 4, F, H, W]`` and text states ``[B, 7, 16]`` for :func:`tiny_wan`."""
    frames, height, width = grid
    return torch.randn(batch, 4, frames, height, width), torch.randn(batch, 7, 16)


class Fp8Emulation(Backend):
    """A plugin offering FP8 through the reference recipe; records the precisions it was asked for."""

    name = "fp8_emulation"
    device_types = ("cpu",)
    priority = 99
    precisions = ("bf16", "fp8")

    def __init__(self, p_dtype=torch.float8_e4m3fn):
        self.seen = []
        self.p_dtype = p_dtype

    def unsupported_reasons(self, q, k, v, block_mask, precision="bf16"):
        self.seen.append(("reasons", precision))
        return [] if q.dtype != torch.float64 else ["no float64"]

    def forward(self, q, k, v, block_mask, scale, precision="bf16"):
        self.seen.append(("forward", precision))
        if precision == "bf16":
            return masked_attention(q, k, v, block_mask, scale)
        if self.p_dtype is torch.float8_e4m3fn:
            return fp8.fp8_reference_attention(q, k, v, block_mask, scale)
        with pytest.MonkeyPatch.context() as patch:  # a worse rounding of P (e5m2: 2 mantissa bits)
            patch.setattr(fp8, "round_fp8", lambda x: x.to(self.p_dtype).to(torch.float32))
            return fp8.fp8_reference_attention(q, k, v, block_mask, scale)
