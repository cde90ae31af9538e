"""When a sparse call runs dense attention instead: the measured crossover, per device type.

Below some size the sparse path loses to dense attention: predicting the mask, the
permutation and the host work of the call cost more than the skipped tiles save, and
a mask that keeps almost everything saves nothing. :func:`dense_reason` decides, from
the shapes and the mask parameters alone (no host synchronisation, the same answer in
eager mode and under ``torch.compile``), whether ``sparse_attention`` runs dense
attention instead. The rule is documented, counted by ``apply_rainfusion``'s handle,
shown by ``rainfusion bench``, and turned off with ``min_tokens=0``.

The numbers (``CROSSOVER``) come from ``benchmarks/crossover_bench.py`` and the model
benchmarks; BENCHMARKS.md has the runs behind them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ._checks import check_int

#: Environment variable that replaces every device's ``min_tokens`` (``0``: always sparse).
MIN_TOKENS_ENV = "RAINFUSION_MIN_TOKENS"


@dataclass(frozen=True)
class Crossover:
    """Where sparse attention starts to pay on one device type.

    Attributes:
        min_tokens: latent (video or image) tokens of a call, text not counted, below which
            dense attention runs. ``0`` turns the rule off.
        max_density: a call whose mask would keep more than this fraction of the tiles
            (estimated from ``sparsity`` and the forced sink and text blocks) runs dense.
        source: what the numbers were measured on.
    """

    min_tokens: int
    max_density: float
    source: str


# Measured crossovers (BENCHMARKS.md, "Dense below the crossover"). Device types not listed
# (NPUs, plugins' devices) have none measured: their calls always run sparse.
CROSSOVER = {
    # H200, one compiled forward of random-weight models (models_e2e_bench.py --modes compiled, bf16, sparsity
    # 0.8, run sparse): LTX-Video (6144 latent tokens, head dim 64) 0.80x dense, Qwen-Image 1328² (6889 tokens,
    # head dim 128) 1.33x; earlier Flux.1-dev 1024² (4096 tokens) 0.92x. Dense below the smallest size measured
    # to win. max_density is an estimate, not a measurement: at Wan2.1-1.3B 480p the sparse call needs 3.1 ms of
    # GPU time at density 0.28 against 11.7 ms dense (call_overhead_bench.py); scaled with the density it ties
    # near 1.
    "cuda": Crossover(min_tokens=6889, max_density=0.9, source="NVIDIA H200, bf16, head dim 64 and 128"),
    # A 2-core Intel Xeon with AVX-512, 2 threads, float32, 4 heads of 64 (crossover_bench.py): sparse won
    # from 2048 latent tokens on (1.12x at 2048 with density 0.63) and lost at 1024 and below (0.4-0.98x);
    # masks keeping 0.72 of the tiles or more lost at every size measured up to 4096 (0.88-0.97x), 0.67 won.
    "cpu": Crossover(min_tokens=2048, max_density=0.7,
                     source="2-core Intel Xeon (AVX-512), float32, head dim 64"),
}

NO_CROSSOVER = Crossover(min_tokens=0, max_density=1.0, source="not measured: always sparse")


def crossover_for(device_type: str, min_tokens: int | None = None) -> Crossover:
    """The crossover that applies: ``min_tokens`` when given, else ``$RAINFUSION_MIN_TOKENS``, else the table.

    ``min_tokens=0`` (given or from the environment) turns the rule off entirely.
    """
    if min_tokens is None:
        env = os.environ.get(MIN_TOKENS_ENV)
        if env is not None and env.strip():
            try:
                min_tokens = int(env)
            except ValueError:
                raise ValueError(f"{MIN_TOKENS_ENV} must be a non-negative int, got {env!r}") from None
            min_tokens = check_int(MIN_TOKENS_ENV, min_tokens, minimum=0)
    table = CROSSOVER.get(device_type, NO_CROSSOVER)
    if min_tokens is None:
        return table
    if min_tokens == 0:
        return NO_CROSSOVER
    return Crossover(min_tokens, table.max_density, table.source if table is not NO_CROSSOVER else "given")


def expected_density(tokens: int, block_size: int, keep: int, forced_blocks: int) -> float:
    """The fraction of tiles a RainFusion2.0 mask keeps at most, known before it is predicted.

    ``forced_blocks`` (sink and text) are whole rows and columns: those rows keep every block,
    the others their ``keep`` best plus the forced columns.
    """
    blocks = max(1, math.ceil(tokens / block_size))
    forced = min(forced_blocks, blocks)
    per_row = min(blocks, keep + forced) / blocks
    return (forced + (blocks - forced) * per_row) / blocks


def dense_reason(device_type: str, video_tokens: int, density: float, min_tokens: int | None = None) -> str | None:
    """Why a call with this many latent tokens and this expected density runs dense (``None``: sparse)."""
    rule = crossover_for(device_type, min_tokens)
    if rule.min_tokens == 0:
        return None
    if video_tokens < rule.min_tokens:
        return f"{video_tokens} latent tokens, below the crossover of {rule.min_tokens} on {device_type}"
    if density > rule.max_density:
        return (f"the mask would keep about {density:.2f} of the tiles, above {rule.max_density:g} "
                f"on {device_type}")
    return None
