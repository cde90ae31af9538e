"""When a cache of device tensors may be filled."""
from __future__ import annotations

import torch


def may_cache(device: torch.device) -> bool:
    """False inside a CUDA-graph capture on ``device``'s type: tensors built there are recorded, not
    written, until the graph replays, so caching them would hand unwritten memory to later calls."""
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
