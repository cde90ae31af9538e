"""Float dtypes the library takes, and the dtype each accumulates in."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype (scores, softmax, means)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
