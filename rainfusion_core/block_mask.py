"""``BlockMask``: which (query block, key block) tiles of attention are computed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._checks import check_int, describe
from .caching import may_cache


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` tokens covering ``length`` tokens (the last may be partial)."""
    return -(-length // block_size)


def query_chunks(q_len: int, kv_len: int, batch_heads: int, block_size: int, chunk_elements: int):
    """``(start, stop)`` query row ranges with at most about ``chunk_elements`` scores per chunk.

    Lets a dense-score computation (reference attention, recall) stay at
    ``O(chunk x kv_len)`` memory instead of ``O(q_len x kv_len)``. Chunks are
    whole blocks when a block's scores fit, single rows at the least.
    """
    rows = max(1, chunk_elements // max(1, batch_heads * kv_len))
    if rows >= block_size:
        rows = rows // block_size * block_size
    for start in range(0, q_len, rows):
        yield start, min(q_len, start + rows)


#: Marks a mask the library built itself (correct by construction): its contents are not re-checked.
_TRUSTED = object()
#: Marks a mask rebuilt from :meth:`BlockMask.as_tuple` parts on the far side of an op boundary: nothing is re-checked.
_UNPACKED = object()
_FIELDS = ("dense", "kv_counts", "kv_indices")


_STAND_INS: dict = {}  # stand-in masks by (batch, heads, q_len, kv_len, block_size, device)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A block-sparse attention pattern, held in two equivalent views.

    Shapes (named dimensions): ``B`` batch, ``H`` query heads, ``NQ = ceil(q_len /
    block_size)`` query blocks, ``NK = ceil(kv_len / block_size)`` key blocks.

    Attributes:
        dense: bool ``[B, H, NQ, NK]``; ``dense[b, h, i, j]`` keeps the tile of
            query block ``i`` and key block ``j``.
        kv_counts: int32 ``[B, H, NQ]``; kept key blocks of each query block row,
            in ``[0, NK]``.
        kv_indices: int32 ``[B, H, NQ, NK]``; the kept key blocks of each row in
            strictly ascending order, left-packed: entries ``[..., :kv_counts]``
            are valid block indices in ``[0, NK)``, entries past the count are
            unspecified.
        block_size: tokens per block, on both the query and key side.
        q_len: query tokens ``Sq``; the last query block holds
            ``q_len - (NQ - 1) * block_size`` of them.
        kv_len: key tokens ``Sk``; likewise for the last key block.

    Invariants: the three tensors share a device, their leading shapes agree,
    ``NQ`` and ``NK`` match the lengths, and the two views describe the same
    pattern (row ``i`` of ``dense`` is true exactly at ``kv_indices[..., i,
    :kv_counts[..., i]]``). A row with no kept block is legal; its output rows
    are zeros.

    Which constructors check what:

    * ``BlockMask(dense, kv_counts, kv_indices, ...)`` checks everything,
      contents included: an index out of range, a row that does not ascend (or
      repeats a block), a count outside ``[0, NK]`` or a ``dense`` view that
      disagrees is refused with the field and the first bad position. Checking
      contents reads them on the host (one synchronisation).
    * :meth:`from_dense`, :meth:`to`, and the masks the library predicts derive
      the index view themselves, are correct by construction, and check only
      shapes, dtypes and devices, without synchronising with the host.

    Kernels still guard every index they load, so a mask whose tensors are
    changed in place after construction can give a wrong answer but never
    makes a kernel read or write out of bounds.
    """

    dense: torch.Tensor
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int
    _origin: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._origin is _UNPACKED:
            return
        for name in ("block_size", "q_len", "kv_len"):
            check_int(f"BlockMask.{name}", getattr(self, name))
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"BlockMask.{name} must be a torch.Tensor, got {describe(value)}")
        nq, nk = num_blocks(self.q_len, self.block_size), num_blocks(self.kv_len, self.block_size)
        if self.dense.dtype != torch.bool or self.dense.dim() != 4:
            raise ValueError(
                f"BlockMask.dense must be a bool tensor [B, H, NQ, NK], got {self.dense.dtype} "
                f"of shape {tuple(self.dense.shape)}"
            )
        batch, heads = self.dense.shape[:2]
        expected = {
            "dense": ((batch, heads, nq, nk), torch.bool),
            "kv_counts": ((batch, heads, nq), torch.int32),
            "kv_indices": ((batch, heads, nq, nk), torch.int32),
        }
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"BlockMask.{name} must be {dtype} of shape {shape} (block_size={self.block_size}, "
                    f"q_len={self.q_len}, kv_len={self.kv_len}), got {tensor.dtype} of shape "
                    f"{tuple(tensor.shape)}"
                )
            if tensor.device != self.dense.device:
                raise ValueError(
                    f"BlockMask.{name} is on {tensor.device} but dense is on {self.dense.device}"
                )
        if self._origin is not _TRUSTED:
            _check_contents(self.dense, self.kv_counts, self.kv_indices)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_dense(cls, mask: torch.Tensor, *, block_size: int, q_len: int, kv_len: int) -> "BlockMask":
        """Build from a bool ``[B, H, NQ, NK]`` mask; no host synchronisation.

        Entries of ``kv_indices`` past a row's count hold that row's skipped
        blocks in ascending order (callers must not rely on it).
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError(f"mask must be a 4-D tensor [B, H, NQ, NK], got {describe(mask)}")
        mask = mask.to(torch.bool).contiguous()
        kept_rank = mask.cumsum(dim=-1, dtype=torch.int32)  # 1-based rank among kept blocks
        counts = kept_rank[..., -1:].contiguous()
        # Kept blocks go to slots 0..count-1 in ascending order, the others after them:
        # a permutation built from cumulative sums and one scatter (plain ops on every device).
        other_rank = (~mask).cumsum(dim=-1, dtype=torch.int32)
        slot = torch.where(mask, kept_rank - 1, counts + other_rank - 1).long()
        blocks = torch.arange(mask.shape[-1], dtype=torch.int32, device=mask.device).expand_as(slot)
        indices = torch.empty_like(blocks).scatter_(-1, slot, blocks)
        return cls(mask, counts.squeeze(-1), indices, block_size, q_len, kv_len, _TRUSTED)

    @classmethod
    def from_tuple(cls, parts: tuple, q_len: int, kv_len: int) -> "BlockMask":
        """The mask :meth:`as_tuple` split, for ``q_len`` query and ``kv_len`` key tokens; nothing is re-checked."""
        dense, kv_counts, kv_indices, block_size = parts
        return cls(dense, kv_counts, kv_indices, block_size, q_len, kv_len, _UNPACKED)

    @classmethod
    def stand_in(cls, batch: int, heads: int, q_len: int, kv_len: int, block_size: int, device) -> "BlockMask":
        """A mask of the right shape, block size, lengths and device whose contents mean nothing.

        What a backend's ``unsupported_reasons`` sees when it is asked before a mask
        exists; its tensors are one-element expansions (nothing is allocated or written).
        """
        key = (batch, heads, q_len, kv_len, block_size, torch.device(device))
        made = _STAND_INS.get(key)
        if made is None:
            shape = (batch, heads, num_blocks(q_len, block_size), num_blocks(kv_len, block_size))
            flag, index = (torch.empty((), dtype=dtype, device=device) for dtype in (torch.bool, torch.int32))
            made = cls(flag.expand(shape), index.expand(shape[:3]), index.expand(shape), block_size, q_len, kv_len,
                       _UNPACKED)
            if may_cache(key[-1]):  # one per class of calls; never one made inside a CUDA-graph capture
                if len(_STAND_INS) >= 256:
                    _STAND_INS.clear()
                _STAND_INS[key] = made
        return made

    # ------------------------------------------------------------------ views
    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(dense, kv_counts, kv_indices, block_size)``: how the mask crosses a custom-op boundary."""
        return self.dense, self.kv_counts, self.kv_indices, self.block_size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, NQ, NK)``."""
        return tuple(self.dense.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.dense.device

    @property
    def density(self) -> float:
        """Kept fraction of the ``NQ x NK`` tiles, averaged over batch and heads.

        Reading it synchronises with the device; do not use it in a hot path.
        """
        if self.dense.device.type == "meta":
            raise ValueError("BlockMask.density: the mask is on the meta device, which holds no values")
        return float(self.dense.float().mean())

    def token_density(self) -> float:
        """Kept fraction of the ``q_len x kv_len`` token pairs (weights partial blocks)."""
        q_sizes = _block_sizes(self.q_len, self.block_size, self.device)
        k_sizes = _block_sizes(self.kv_len, self.block_size, self.device)
        kept = (self.dense.double() * q_sizes[:, None] * k_sizes[None, :]).sum(dim=(-1, -2))
        return float(kept.mean() / (self.q_len * self.kv_len))

    def to(self, device: torch.device | str) -> "BlockMask":
        return BlockMask(
            self.dense.to(device), self.kv_counts.to(device), self.kv_indices.to(device),
            self.block_size, self.q_len, self.kv_len, self._origin,
        )

    def token_mask(self, q_start: int = 0, q_end: int | None = None) -> torch.Tensor:
        """Bool ``[B, H, q_end - q_start, kv_len]`` token mask of query rows ``[q_start, q_end)``."""
        q_end = self.q_len if q_end is None else q_end
        rows = torch.arange(q_start, q_end, device=self.device) // self.block_size
        cols = torch.arange(self.kv_len, device=self.device) // self.block_size
        return self.dense[:, :, rows][..., cols]  # memory follows the token counts, never block_size

    def to_flex_block_mask(self):
        """The same pattern as a ``torch.nn.attention.flex_attention.BlockMask``.

        Kept tiles are passed as *full* blocks, so compiled FlexAttention
        kernels skip them without evaluating a ``mask_mod``; the ``mask_mod``
        still encodes the pattern token by token, because eager FlexAttention
        applies only the ``mask_mod``.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        dense, bs = self.dense, self.block_size

        def block_pattern(b, h, q_idx, kv_idx):
            return dense[b, h, q_idx // bs, kv_idx // bs]

        return FlexBlockMask.from_kv_blocks(
            torch.zeros_like(self.kv_counts), self.kv_indices,
            full_kv_num_blocks=self.kv_counts, full_kv_indices=self.kv_indices,
            BLOCK_SIZE=bs, mask_mod=block_pattern, seq_lengths=(self.q_len, self.kv_len),
        )

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, q_len={self.q_len}, "
            f"kv_len={self.kv_len}, device={self.device})"
        )


def check_mask_matches(q, k, block_mask) -> None:
    """Check that ``block_mask`` describes attention of ``q`` over ``k``."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a rainfusion_core.BlockMask, got {describe(block_mask)}")
    batch, heads, q_len = q.shape[:3]
    if (block_mask.q_len, block_mask.kv_len) != (q_len, k.shape[2]):
        raise ValueError(
            f"block_mask lengths (q_len={block_mask.q_len}, kv_len={block_mask.kv_len}) must match "
            f"q and k sequence lengths ({q_len}, {k.shape[2]})"
        )
    if block_mask.shape[:2] != (batch, heads):
        raise ValueError(
            f"block_mask batch and heads {block_mask.shape[:2]} must equal q's (B, H) = {(batch, heads)}"
        )
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")


def _first(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _check_contents(dense: torch.Tensor, kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> None:
    """Refuse an index view that is out of range, not strictly ascending, or not the ``dense`` view."""
    if dense.device.type == "meta":
        raise ValueError("BlockMask(...) checks the mask's contents, but its tensors are on the meta device, which "
                         "holds none: build the mask on a real device (BlockMask.from_dense accepts meta tensors)")
    nk = dense.shape[-1]
    counts, indices = kv_counts.long(), kv_indices.long()
    # Every check is computed on the device and read back at once: one host synchronisation for a
    # valid mask. The views' agreement is checked on the in-range slots only (the others fail earlier).
    bad_counts = (counts < 0) | (counts > nk)
    live = torch.arange(nk, device=dense.device) < counts[..., None]  # the slots [..., :count]
    in_range = (indices >= 0) & (indices < nk)
    bad_range = live & ~in_range
    bad_order = live[..., 1:] & (indices[..., 1:] <= indices[..., :-1])
    listed = live & in_range
    rebuilt = torch.zeros(dense.shape, dtype=torch.int32, device=dense.device)
    rebuilt.scatter_add_(-1, torch.where(listed, indices, 0), listed.to(torch.int32))
    bad_views = rebuilt.bool() != dense
    found = torch.stack([b.any() for b in (bad_counts, bad_range, bad_order, bad_views)]).tolist()
    if found[0]:
        at = _first(bad_counts)
        raise ValueError(f"BlockMask.kv_counts{list(at)} = {int(counts[at])} is outside [0, NK={nk}]")
    if found[1]:
        at = _first(bad_range)
        raise ValueError(f"BlockMask.kv_indices{list(at)} = {int(indices[at])} is outside [0, NK={nk}) "
                         f"(kv_counts{list(at[:3])} = {int(counts[at[:3]])})")
    if found[2]:
        at = _first(bad_order)
        at = (*at[:3], at[3] + 1)
        raise ValueError(
            f"BlockMask.kv_indices{list(at)} = {int(indices[at])} does not follow "
            f"{int(indices[(*at[:3], at[3] - 1)])}: each row's first kv_counts entries must be strictly "
            "ascending (no repeated block)"
        )
    if found[3]:
        at = _first(bad_views)
        held = "keeps" if bool(dense[at]) else "does not keep"
        listed = "does not list" if bool(dense[at]) else "lists"
        raise ValueError(
            f"BlockMask.dense{list(at)} {held} key block {at[3]} but kv_indices[{', '.join(map(str, at[:3]))}, "
            f":kv_counts] {listed} it: the two views must describe the same pattern"
        )


def _block_sizes(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    sizes = torch.full((num_blocks(length, block_size),), float(block_size), dtype=torch.float64, device=device)
    sizes[-1] = length - (sizes.numel() - 1) * block_size
    return sizes


__all__ = ["BlockMask", "check_mask_matches", "num_blocks", "query_chunks"]
