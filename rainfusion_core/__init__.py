"""rainfusion_core: hardware-portable RainFusion2.0 block-sparse attention.

Importing the package does no work beyond defining names: backends, plugins
and accelerator stacks are loaded on first use.
"""
from .api import SparseAttentionPlan, block_sparse_attention, plan_sparse_attention, sparse_attention
from .backend import Backend
from .block_mask import BlockMask
from .errors import BackendError, BackendUnavailableError, UnknownBackendError, UnsupportedInputError
from .layout import VideoLayout
from .permutation import Permutation, build_permutation
from .prediction import block_means, predict_block_mask
from .registry import BackendInfo, get_backend, list_backends, register_backend, unregister_backend

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendError", "BackendInfo", "BackendUnavailableError", "BlockMask", "Permutation",
    "SparseAttentionPlan", "plan_sparse_attention",
    "UnknownBackendError", "UnsupportedInputError", "VideoLayout", "block_means", "block_sparse_attention",
    "build_permutation", "get_backend", "list_backends", "predict_block_mask", "register_backend",
    "sparse_attention", "unregister_backend",
]
