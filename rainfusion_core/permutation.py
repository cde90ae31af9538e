"""The RainFusion2.0 ("rf_v2") token permutation: spatial 8x8 tiles, text last.

``permuted[i] = original[indices[i]]`` and ``original[j] = permuted[inverse[j]]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .caching import may_cache
from .layout import VideoLayout

TILE = 8
# A plain dict (not functools.lru_cache) so torch.compile guards on it and reuses what eager calls
# cached; traced code reads it and never writes it (caching.may_cache).
_CACHE: dict[tuple[VideoLayout, torch.device], "Permutation"] = {}
_CACHE_SIZE = 64


@dataclass(frozen=True, eq=False)
class Permutation:
    """A bijection of the ``S = layout.seq_len`` token positions.

    Attributes:
        layout: the layout it was built for.
        indices: LongTensor ``[S]``; ``permuted[i] = original[indices[i]]``.
        inverse: LongTensor ``[S]``; ``original[j] = permuted[inverse[j]]``.
    """

    layout: VideoLayout
    indices: torch.Tensor
    inverse: torch.Tensor

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Tokens of ``x`` along ``dim`` in permuted order (a gathered copy)."""
        return x.index_select(dim, self.indices)

    def undo(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Tokens of ``x`` along ``dim`` back in the original order (a gathered copy)."""
        return x.index_select(dim, self.inverse)


def _tiled(grid: torch.Tensor) -> torch.Tensor:
    """Flatten a ``[rows, cols]`` grid (both multiples of 8) tile by tile, each tile in raster order."""
    rows, cols = grid.shape
    return grid.reshape(rows // TILE, TILE, cols // TILE, TILE).permute(0, 2, 1, 3).reshape(-1)


def _frame_orders(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order inside the first frame and inside every later frame (offsets within a frame)."""
    grid = torch.arange(height * width, device=device).view(height, width)
    if height % TILE == 0 and width % TILE == 0:
        order = _tiled(grid)
        return order, order
    main_h, main_w = height - height % TILE, width - width % TILE
    later = torch.cat(
        [
            _tiled(grid[:main_h, :main_w]),
            grid[main_h:, :].reshape(-1),  # bottom remainder rows, all columns
            grid[:main_h, main_w:].reshape(-1),  # right remainder columns of the main rows
        ]
    )
    return grid.reshape(-1), later


def _build(layout: VideoLayout, device: torch.device) -> Permutation:
    first, later = _frame_orders(layout.height, layout.width, device)
    frame_len = layout.frame_len
    offsets = torch.arange(1, layout.frames, device=device).unsqueeze(1) * frame_len
    video = torch.cat([first, (later.unsqueeze(0) + offsets).reshape(-1)])
    text = torch.arange(layout.text_len, device=device)
    if layout.text_position == "head":
        indices = torch.cat([video + layout.text_len, text])
    else:
        indices = torch.cat([video, text + layout.video_len])
    inverse = torch.empty_like(indices)
    inverse[indices] = torch.arange(indices.numel(), device=device)
    return Permutation(layout, indices, inverse)


def _canonical_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu" and device.index is None:
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            device = torch.device(device.type, module.current_device())
    return device


def build_permutation(layout: VideoLayout, device: torch.device | str | None = None) -> Permutation:
    """The rf_v2 permutation of ``layout``, built with tensor ops on ``device``.

    Video tokens are regrouped frame by frame into 8x8 spatial tiles so that
    each attention block of 128 consecutive permuted tokens covers two compact
    tiles; text tokens move to the end. When height or width is not a multiple
    of 8, the first frame keeps raster order and each later frame lists its
    tiled main region, then the bottom remainder rows, then the right
    remainder columns (``docs/design.md``).

    The result is built once per layout and device and cached; each call hands
    out copies of the cached tensors, so writing into them never changes what
    later calls (or the library's own calls) get.
    """
    perm = cached_permutation(layout, device)
    return Permutation(perm.layout, perm.indices.clone(), perm.inverse.clone())


def cached_permutation(layout: VideoLayout, device: torch.device | str | None = None) -> Permutation:
    """:func:`build_permutation` without the copies: the cached object itself, for the library's own reads.

    Never hand its tensors to a caller who might write into them.
    """
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {type(layout).__name__}")
    key = (layout, _canonical_device(device))
    perm = _CACHE.get(key)
    if perm is None:
        perm = _build(*key)
        # Inside a CUDA-graph capture the build's kernels are recorded, not run: caching that
        # result would hand unwritten indices to later eager calls.
        if may_cache(key[1]):
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.clear()
            _CACHE[key] = perm
    return perm
