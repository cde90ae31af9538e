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


def _rope_3d(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over (frame, row, column): the head dim is split in three parts as Wan does."""
    dim = x.shape[-1]
    parts = [dim - 4 * (dim // 6), 2 * (dim // 6), 2 * (dim // 6)]  # time gets the rest, like Wan2.1
    out, start = [], 0
    for axis, size in enumerate(parts):
        half = size // 2
        freqs = base ** (-torch.arange(half, dtype=torch.float64) / max(half, 1))
        angle = (pos[:, axis : axis + 1].double() * freqs).float()  # [S, half]
        a, b = x[..., start : start + half], x[..., start + half : start + size]
        out += [a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()]
        start += size
    return torch.cat(out, dim=-1)


def video_dit_qkv(
    layout: VideoLayout,
    heads: int,
    head_dim: int,
    *,
    batch: int = 1,
    objects: int = 3,
    channels: int = 32,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
):
    """q, k, v ``[B, H, S, D]`` built the way a video DiT builds them, from a synthetic latent video.

    1. Latent content ``[F, Hh, W, C]``: a smooth random background (a few
       low spatial frequencies, drifting slowly over time) plus ``objects``
       Gaussian blobs, each with its own feature vector, moving along a
       straight line across frames.
    2. Per-head random projections ``W_q, W_k, W_v`` (``C -> D``) of each
       token's features, with a little token noise.
    3. 3D rotary position embedding of q and k over (frame, row, column), the
       head dim split as Wan2.1 splits it.
    Text tokens (``layout.text_len``) get random features. The result has the
    locality real video attention has: nearby tokens and the same object in
    other frames attend to each other. Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    f, h, w = torch.meshgrid(
        torch.arange(layout.frames), torch.arange(layout.height), torch.arange(layout.width), indexing="ij"
    )
    grid = torch.stack([f, h, w], dim=-1).float()  # [F, Hh, W, 3]
    # --- smooth background: low-frequency waves, drifting slowly with time
    waves = randn(8, 3) * torch.tensor([0.05, 0.5 / max(layout.height, 1) * 6, 0.5 / max(layout.width, 1) * 6])
    background = torch.sin(grid @ waves.T + 6.28 * torch.rand(8, generator=gen)) @ randn(8, channels)
    # --- moving objects: Gaussian blobs on straight paths
    content = background / 8**0.5
    for _ in range(objects):
        start = torch.rand(2, generator=gen) * torch.tensor([layout.height, layout.width])
        velocity = randn(2) * 0.6
        radius = 1.5 + 2.0 * float(torch.rand(1, generator=gen))
        centre = start + velocity * grid[..., :1]  # [F, Hh, W, 2] broadcast over frames
        dist2 = ((grid[..., 1:] - centre) ** 2).sum(-1, keepdim=True)
        content = content + torch.exp(-dist2 / (2 * radius**2)) * randn(channels) * 2.0
    tokens = content.reshape(-1, channels)  # [S_video, C]
    text = randn(layout.text_len, channels)
    feats = torch.cat([text, tokens] if layout.text_position == "head" else [tokens, text])  # [S, C]
    pos = grid.reshape(-1, 3)
    pad = torch.zeros(layout.text_len, 3)
    pos = torch.cat([pad, pos] if layout.text_position == "head" else [pos, pad])

    def project():
        weight = randn(heads, channels, head_dim) / channels**0.5
        x = feats.unsqueeze(0) @ weight  # [H, S, D]
        return x + 0.1 * randn(*x.shape)

    q, k, v = project(), project(), project()
    q, k = _rope_3d(q * 2.0, pos), _rope_3d(k * 2.0, pos)
    return tuple(x.unsqueeze(0).expand(batch, -1, -1, -1).to(device, dtype).contiguous() for x in (q, k, v))
