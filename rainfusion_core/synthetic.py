"""Video-like synthetic queries, keys and values for demos, benchmarks and mask pictures."""
from __future__ import annotations

import torch

from .layout import VideoLayout


def video_like_qkv(
    layout: VideoLayout,
    heads: int,
    head_dim: int,
    *,
    batch: int = 1,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    sharpness: float = 3.0,
    noise: float = 0.3,
    seed: int | None = None,
):
    """``q, k, v [B, H, S, D]`` whose q and k vary smoothly with each token's (frame, row, column).

    Each head draws random spatio-temporal frequencies; a token's features
    are sines and cosines of its position at those frequencies, scaled by
    ``sharpness``, plus Gaussian ``noise``. Nearby tokens are similar, so
    attention is local as in video DiTs; iid random q/k would spread attention
    evenly and make any sparsity look bad. Text tokens (if any) get pure noise.
    ``v`` is Gaussian. Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    f, h, w = torch.meshgrid(
        torch.arange(layout.frames), torch.arange(layout.height), torch.arange(layout.width), indexing="ij"
    )
    pos = torch.stack([f / 4.0, h / 8.0, w / 8.0], dim=-1).reshape(-1, 3).float()  # [S_video, 3]
    freqs = torch.randn(heads, 3, head_dim // 2, generator=gen)  # [H, 3, D/2]
    phase = pos @ freqs  # [H, S_video, D/2]
    video = torch.cat([phase.sin(), phase.cos()], dim=-1) * sharpness  # [H, S_video, D']
    if video.shape[-1] < head_dim:  # odd head dim
        video = torch.cat([video, torch.zeros(heads, video.shape[1], 1)], dim=-1)
    text = torch.zeros(heads, layout.text_len, head_dim)
    parts = [text, video] if layout.text_position == "head" else [video, text]
    base = torch.cat(parts, dim=1).expand(batch, -1, -1, -1)

    def noisy():
        return base + noise * torch.randn(base.shape, generator=gen)

    q, k = noisy(), noisy()
    v = torch.randn(base.shape, generator=gen)
    return tuple(x.to(device, dtype) for x in (q, k, v))
