"""When a cache of device tensors may be filled."""
from __future__ import annotations

import torch


def may_cache(device: torch.device) -> bool:
    """Whether a tensor just built for ``device`` may be kept for later calls.

    Never while ``torch.compile`` traces: the tensor is a stand-in of the graph, and a cache
    write would be replayed after each run of the compiled code, storing graph outputs that a
    CUDA-graph replay may overwrite (the library's ops look their cached tensors up when they
    run, outside any trace). Never inside a CUDA-graph capture on ``device``'s type either:
    tensors built there are recorded, not written, until the graph replays.
    """
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
