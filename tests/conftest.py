"""pytest configuration: the Triton interpreter on machines without a GPU, and reproducible seeds.

Helpers and markers live in ``helpers.py``.
"""
import os

import pytest
import torch

from helpers import seed_for

# Without a GPU, the Triton backend is tested through Triton's CPU interpreter. The flag must be
# set before Triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests check the sparse kernels at small shapes, below the measured dense crossover
# (rainfusion_core/crossover.py), so by default every call runs sparse here. The tests of the
# crossover itself remove this (tests/test_crossover.py); subprocesses inherit it.
os.environ.setdefault("RAINFUSION_MIN_TOKENS", "0")

# Under pytest-xdist (tools/gpu_suite.py) each worker compiles into its own Inductor cache, so no two
# processes write one cache entry at the same time. Triton's own cache is safe to share (it renames
# finished files into place) and sharing it saves each worker the Gluon and Triton compiles.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"rainfusion-tests-inductor-{_WORKER}"))


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh but reproducible random inputs per test.
    torch.manual_seed(seed_for(request.node.nodeid))
