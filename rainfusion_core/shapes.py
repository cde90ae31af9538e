"""The reference shapes of docs/design.md, one table for the CLI, the demo and the benchmarks."""
from __future__ import annotations

#: name: (batch, heads, latent frames, height, width, text tokens); bf16, head dim 128.
REFERENCE_SHAPES = {
    "wan1.3b": (1, 12, 21, 30, 52, 0),  # Wan2.1-1.3B, 480p, 81 frames: S = 32760
    "wan14b": (1, 40, 21, 45, 80, 0),  # Wan2.1-14B, 720p, 81 frames: S = 75600
    "hunyuan": (1, 24, 33, 45, 80, 256),  # HunyuanVideo, 720p, 129 frames: S = 119056
}
REFERENCE_HEAD_DIM = 128
