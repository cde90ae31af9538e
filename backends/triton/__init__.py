"""The ``triton`` backend family: the adapter, its launcher and planner, and the kernels.

* ``backend.py`` -- :class:`TritonBackend`, what the registry sees (no Triton import).
* ``launch.py`` -- chooses the kernel, tiles, head chunks and TMA descriptors, then launches.
* ``attention.py`` -- the portable block-sparse flash-attention kernel.
* ``hopper/attention.py`` -- the warp-specialised sm_90 kernel (Gluon).
* ``prediction.py`` -- block means and per-row block selection kernels.
* ``permute.py`` -- the row-gather kernel behind permuted copies.
"""
from .backend import TritonBackend

__all__ = ["TritonBackend"]
