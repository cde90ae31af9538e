"""rainfusion_core: hardware-portable RainFusion2.0 block-sparse attention.

Importing the package does no work: every public name is loaded from its
module on first use (PEP 562), so ``rainfusion --help`` never imports torch,
and backends, plugins and accelerator stacks load only when a call needs them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SparseAttentionPlan": "api", "block_sparse_attention": "api", "plan_sparse_attention": "api",
    "sparse_attention": "api",
    "Backend": "backend",
    "BlockMask": "block_mask",
    "BackendError": "errors", "BackendUnavailableError": "errors", "UnknownBackendError": "errors",
    "UnsupportedInputError": "errors",
    "VideoLayout": "layout",
    "merge_attention": "merge",
    "Permutation": "permutation", "build_permutation": "permutation",
    "RingPlan": "ring", "ring_sparse_attention": "ring",
    "block_means": "prediction", "predict_block_mask": "prediction",
    "BackendInfo": "registry", "get_backend": "registry", "list_backends": "registry",
    "register_backend": "registry", "registered_backends": "registry", "scoped_backends": "registry",
    "unregister_backend": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rainfusion_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
