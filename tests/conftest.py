"""Shared helpers: naive float64 definitions written independently of the library."""
from __future__ import annotations

import importlib.util
import os
import zlib

import pytest
import torch

# Without a GPU, the Triton backend is tested through Triton's CPU interpreter. The flag must be
# set before Triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Installed with RAINFUSION_SKIP_CPP=1 the C++ extension, and so the ``cpu`` backend, is absent on purpose.
needs_cpp = pytest.mark.skipif(os.environ.get("RAINFUSION_SKIP_CPP") == "1",
                               reason="RAINFUSION_SKIP_CPP=1: installed without the C++ extension (the cpu backend)")


def triton_device() -> str:
    """Where Triton tests run: ``"cuda"`` on a GPU, ``"cpu"`` under the interpreter.

    Call at module level: skips the whole module when Triton is missing, or when
    there is no GPU and ``TRITON_INTERPRET`` is not 1.
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install triton)", allow_module_level=True)
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
    return "cpu"


def seed_for(nodeid: str) -> int:
    """A test's random seed: different per test, the same in every run (``hash`` of a str is salted per process)."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh but reproducible random inputs per test.
    torch.manual_seed(seed_for(request.node.nodeid))


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
