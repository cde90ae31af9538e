"""Timing helper shared by the CLI, the demo and the benchmark scripts."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, device, *, repeats: int = 5) -> float:
    """Median time of ``fn()`` in milliseconds after one warm-up call.

    On CUDA this is ``triton.testing.do_bench`` (events, median) when Triton is
    installed; elsewhere a host clock around synchronised calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
