"""Deprecated module path, kept for one release: use ``rainfusion_core.backends.triton``.

``block_sparse_attention_triton`` now lives in ``rainfusion_core.backends.triton.launch``
and ``TritonBackend`` in ``rainfusion_core.backends.triton``.
"""
import warnings

from .triton import TritonBackend
from .triton.launch import block_sparse_attention_triton

warnings.warn("rainfusion_core.backends.triton_backend is deprecated; import from rainfusion_core.backends.triton "
              "(TritonBackend) and rainfusion_core.backends.triton.launch (block_sparse_attention_triton)",
              DeprecationWarning, stacklevel=2)

__all__ = ["TritonBackend", "block_sparse_attention_triton"]
