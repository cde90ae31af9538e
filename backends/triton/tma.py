"""What a TMA descriptor can read: the rule both Triton kernels' launchers check before they build one."""
from __future__ import annotations

import torch


def tma_readable(x: torch.Tensor) -> bool:
    """A unit last stride, and every other stride and the start whole 16 bytes and not zero (a stride-0
    view, such as k expanded over heads, is not a layout a descriptor can describe)."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s > 0 and s * size % 16 == 0 for s in x.stride()[:-1])
