"""The reference shapes of docs/design.md, one table for the CLI, the demo and the benchmarks."""
from __future__ import annotations

#: name: (batch, heads, latent frames, height, width, text tokens); bf16, head dim 128.
REFERENCE_SHAPES = {
    "wan1.3b": (1, 12, 21, 30, 52, 0),  # Wan2.1-1.3B, 480p, 81 frames: S = 32760
    "wan14b": (1, 40, 21, 45, 80, 0),  # Wan2.1-14B, 720p, 81 frames: S = 75600
    "hunyuan": (1, 24, 33, 45, 80, 256),  # HunyuanVideo, 720p, 129 frames: S = 119056
}
REFERENCE_HEAD_DIM = 128

#: name: (heads, head dim, latent frames, height, width, text tokens, text position); batch 1, bf16. The model
#: attention shapes at which benchmarks/peers_bench.py and benchmarks/schedules_bench.py time the Hopper kernel.
KERNEL_SHAPES = {
    "wan-1.3b": (12, 128, 21, 30, 52, 0, "head"),
    "wan-14b": (40, 128, 21, 45, 80, 0, "head"),
    "hunyuanvideo": (24, 128, 33, 45, 80, 256, "tail"),
    "cogvideox-5b": (48, 64, 13, 30, 45, 226, "head"),
}


def kernel_shape(name: str):
    """``(heads, head dim, layout)`` of ``KERNEL_SHAPES[name]``."""
    from .layout import VideoLayout  # here, not at import: the CLI reads this table without torch

    heads, head_dim, frames, height, width, text, position = KERNEL_SHAPES[name]
    return heads, head_dim, VideoLayout(frames, height, width, text_len=text, text_position=position)
