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


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh but reproducible random inputs per test.
    torch.manual_seed(seed_for(request.node.nodeid))
