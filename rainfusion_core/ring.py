"""RainFusion2.0 sparse attention over a sequence spread across ranks: ring attention.

Each of ``R`` ranks of a process group holds ``L`` rows of q, k and v: tokens of the
model's sequence of ``S = R * L`` tokens (``held[r]`` lists the model positions of rank
``r``'s rows; by default the contiguous chunks). A :class:`RingPlan` is made once per
layout and split; each call then runs these steps:

1. **Reshard.** The blocks of the permuted sequence are dealt to the ranks in turn (rank
   ``j`` owns blocks ``j, j + R, j + 2R, ...``: whole blocks, so a mask row never spans two
   ranks, and the first frame's and the text's blocks, whose rows keep every key, spread
   evenly). One all-to-all sends each row of q, k, v to the rank whose shard holds its
   permuted position; each rank then holds its shard, its blocks in ascending order.
2. **Mask.** Each rank takes the block means of its shard; one all-gather of those
   (``S / block_size`` rows of ``D`` per head) gives every rank every mean, and each rank
   selects the whole mask exactly as one process would (the same block means, the same
   pooled scores, the same selection).
3. **Ring.** The k and v shards are all-gathered (diffusers' ``rotate_method="allgather"``);
   step ``j`` attends the rank's queries to shard ``j``'s kept blocks only (the mask's
   rows of rank ``r``'s blocks, columns of rank ``j``'s) and returns ``(out_j, lse_j)``.
   On the CPU a step with no kept block is skipped; on an accelerator every step launches
   (a row without a kept block ends at once), because knowing that a step is empty would
   make the host wait for the device.
4. **Merge.** The parts are merged exactly through their log-sum-exp
   (:func:`~rainfusion_core.merge.merge_attention`) in the fixed order ``j = 0 .. R-1``,
   so the result never depends on timing.
5. **Back.** The inverse all-to-all returns each output row to the rank that holds its token.

Tokens outside ``keep`` (padded text) are no part of the sparse sequence: they are never
keys, and their rows attend densely to every kept key (a key-padding mask), in the same
ring steps and merged the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_qkv, check_tensor_layout, describe
from .block_mask import BlockMask
from .call import resolve_backend
from .dtypes import accumulation_dtype
from .layout import VideoLayout
from .mask_rule import MaskRule
from .merge import merge_attention
from .ops import attention, prediction_backend
from .permutation import cached_permutation
from .precision import DEFAULT_PRECISION, check_precision
from .selection import pooled_scores


@dataclass(frozen=True, eq=False)
class RingPlan:
    """Where every row goes in a ring call of one layout on one rank; made by :meth:`build`.

    Attributes:
        layout: the layout of the sparse sequence (padded text excluded).
        degree, rank: the ring's size and this rank's place in it.
        local: rows each rank holds (``S = degree * local`` tokens in all).
        block_size: tokens per mask block.
        blocks: per rank, the blocks it owns (``arange(j, NB, degree)``), on ``device``;
            ``dealt`` all of them in rank order (where each rank's gathered rows go).
        lengths: per rank, the tokens of its shard.
        send_index: this rank's rows that take part, ordered by destination rank, then permuted position.
        send_splits, recv_splits: rows sent to / received from each rank in the all-to-all.
        to_shard: ``shard[i] = received[to_shard[i]]``; ``to_buffer`` its inverse.
        padded_rows: this rank's rows outside ``keep`` (``None``: every token takes part).
        to_local: row ``i`` of this rank's output is row ``to_local[i]`` of the rows sent back
            followed by the padded rows.
    """

    layout: VideoLayout
    degree: int
    rank: int
    local: int
    block_size: int
    blocks: tuple
    dealt: torch.Tensor
    lengths: tuple
    send_index: torch.Tensor
    send_splits: tuple
    recv_splits: tuple
    to_shard: torch.Tensor
    to_buffer: torch.Tensor
    padded_rows: torch.Tensor | None
    to_local: torch.Tensor

    @classmethod
    def build(cls, layout: VideoLayout, *, degree: int, rank: int, block_size: int = 128,
              held: torch.Tensor | None = None, keep: torch.Tensor | None = None, device=None) -> "RingPlan":
        """The plan of rank ``rank`` of ``degree`` for the sparse sequence ``layout``.

        ``held``: LongTensor ``[degree, local]``, the model position of each rank's rows
        (``None``: rank ``r`` holds positions ``[r * local, (r + 1) * local)``). ``keep``: the
        sorted model positions of the sparse sequence (``None``: all ``degree * local``); its
        length must be ``layout.seq_len``. ``device``: where the index tensors live.
        """
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {describe(layout)}")
        for name, value, low in (("degree", degree, 1), ("rank", rank, 0), ("block_size", block_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= degree:
            raise ValueError(f"rank must be below degree ({degree}), got {rank}")
        for name, x, dims in (("held", held, 2), ("keep", keep, 1)):
            if x is not None and (not isinstance(x, torch.Tensor) or x.dim() != dims or x.is_floating_point()
                                  or x.is_complex() or x.dtype == torch.bool):
                raise ValueError(f"{name} must be a {dims}-D integer tensor of model positions, got {describe(x)}")
        if held is None:
            if keep is not None:
                raise ValueError("with keep=, pass held= too: the whole sequence's rows are not known from keep")
            if layout.seq_len % degree:
                raise ValueError(f"{layout.seq_len} tokens do not split into {degree} equal chunks: pass held=")
            held = torch.arange(layout.seq_len).view(degree, layout.seq_len // degree)
        held = held.to("cpu", torch.long)
        if held.shape[0] != degree:
            raise ValueError(f"held must have shape [degree={degree}, local], got {tuple(held.shape)}")
        local = held.shape[1]
        size = degree * local
        if not torch.equal(held.flatten().sort().values, torch.arange(size)):
            raise ValueError(f"held must list each of the {size} model positions once")
        seq_positions = torch.arange(size) if keep is None else keep.to("cpu", torch.long)
        if seq_positions.numel() != layout.seq_len:
            raise ValueError(f"keep has {seq_positions.numel()} positions but layout.seq_len is {layout.seq_len}")
        if keep is not None and (seq_positions.numel() and (seq_positions.min() < 0 or seq_positions.max() >= size
                                                            or bool((seq_positions.diff() <= 0).any()))):
            raise ValueError(f"keep must be increasing model positions in [0, {size})")
        count = layout.seq_len
        nblocks = math.ceil(count / block_size)
        if nblocks < degree:
            raise ValueError(f"{count} tokens make {nblocks} blocks of {block_size}, fewer than the {degree} ranks of "
                             "the ring: every rank needs a query block (a smaller block_size or ring degree)")

        owner = torch.empty(size, dtype=torch.long)
        row = torch.empty(size, dtype=torch.long)
        owner[held.flatten()] = torch.arange(degree).repeat_interleave(local)
        row[held.flatten()] = torch.arange(local).repeat(degree)
        model = seq_positions[cached_permutation(layout, torch.device("cpu")).indices]  # of each permuted position
        positions = torch.arange(count)
        dest = (positions // block_size) % degree  # blocks dealt in turn
        lengths = torch.bincount(dest, minlength=degree)
        source = owner[model]
        # sent in ascending (destination, permuted position): a shard's rows arrive in its own order
        mine = (source == rank).nonzero().flatten()
        mine = mine[torch.argsort(dest[mine], stable=True)]
        send_index = row[model[mine]]
        send_splits = torch.bincount(dest[mine], minlength=degree)
        shard_source = source[dest == rank]  # this rank's shard: its blocks' positions, ascending
        recv_splits = torch.bincount(shard_source, minlength=degree)
        to_buffer = torch.argsort(shard_source, stable=True)  # received rows come by source, then position
        to_shard = torch.empty_like(to_buffer)
        to_shard[to_buffer] = torch.arange(to_buffer.numel())
        padded = None
        if keep is not None:
            taking = torch.zeros(size, dtype=torch.bool)
            taking[seq_positions] = True
            padded = (~taking[held[rank]]).nonzero().flatten()
        arrived = send_index if padded is None else torch.cat([send_index, padded])
        to_local = torch.empty_like(arrived)
        to_local[arrived] = torch.arange(arrived.numel())
        move = (lambda x: x) if device is None else (lambda x: x.to(device))
        blocks = tuple(move(torch.arange(j, nblocks, degree)) for j in range(degree))
        return cls(layout, degree, rank, local, block_size, blocks, torch.cat(blocks), tuple(lengths.tolist()),
                   move(send_index),
                   tuple(send_splits.tolist()), tuple(recv_splits.tolist()), move(to_shard), move(to_buffer),
                   None if padded is None else move(padded), move(to_local))

    @property
    def shard_len(self) -> int:
        return self.lengths[self.rank]


# --------------------------------------------------------------------------- collectives
def _all_to_all(x: torch.Tensor, out_splits, in_splits, group) -> torch.Tensor:
    """Rows of ``x [n, F]`` exchanged: ``in_splits[j]`` rows go to rank ``j``, ``out_splits[j]`` come from it."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), list(out_splits), list(in_splits), group))


def _all_gather_rows(x: torch.Tensor, counts, group) -> list[torch.Tensor]:
    """Every rank's rows of ``x [counts[rank], F]`` (zero-padded to the largest count on the wire)."""
    from torch.distributed import _functional_collectives as funcol

    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    widest = max(counts)
    if x.shape[0] < widest:
        x = torch.cat([x, x.new_zeros((widest - x.shape[0],) + tuple(x.shape[1:]))])
    gathered = funcol.wait_tensor(gather(x.contiguous(), 0, group))
    return [gathered[j * widest: j * widest + n] for j, n in enumerate(counts)]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, D]`` as ``[n, B * H * D]`` rows (a copy)."""
    return x.permute(2, 0, 1, 3).flatten(1)


def _bnsd(rows: torch.Tensor, batch: int, heads: int, dim: int) -> torch.Tensor:
    """``[n, B * H * D]`` rows back as a ``[B, H, n, D]`` view."""
    return rows.unflatten(1, (batch, heads, dim)).permute(1, 2, 0, 3)


# --------------------------------------------------------------------------- one call
def ring_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, *, group,
                          sparsity: float, first_frame_sink: bool | None = None, scale: float | None = None,
                          backend=None, precision: str = DEFAULT_PRECISION, tensor_layout: str = "BNSD",
                          share_batch_mask: bool = False, on_mask=None):
    """RainFusion2.0 attention of a sequence spread over the ranks of ``group``, on this rank's rows.

    Every rank of ``group`` calls it at once, with its own rows and its own ``plan``
    (:meth:`RingPlan.build` with this rank's ``rank``). ``q [B, Hq, L, D]``, ``k, v
    [B, Hkv, L, D]`` (``"BNSD"``) or ``[B, L, H, D]`` (``"BSND"``) are this rank's rows
    ``plan.local``; the other arguments are those of :func:`rainfusion_core.sparse_attention`
    and must be the same on every rank. Returns this rank's output rows, like ``q``.

    The mask is the one a single process predicts on the whole sequence (block means
    gathered from all ranks); the output equals a single process's up to the rounding of
    the merge. ``on_mask(mask)`` sees the whole :class:`BlockMask` of each call.

    Arguments are checked on each rank before any exchange; a rank whose own arguments are
    wrong raises there while the others wait in the first exchange (until the process
    group's timeout), as with any collective.
    """
    tensor_layout = check_tensor_layout(tensor_layout)
    if not isinstance(plan, RingPlan):
        raise TypeError(f"plan must be a RingPlan (RingPlan.build), got {describe(plan)}")
    if tensor_layout == "BSND":
        views = [x.transpose(1, 2) if isinstance(x, torch.Tensor) and x.dim() == 4 else x for x in (q, k, v)]
    else:
        views = [q, k, v]
    check_qkv(*views)
    q_local, k_local, v_local = views
    if q_local.shape[2] != plan.local or k_local.shape[2] != plan.local:
        raise ValueError(f"q and k hold {q_local.shape[2]} and {k_local.shape[2]} rows; the plan is for "
                         f"{plan.local} rows per rank")
    _check_group(group, plan)
    precision = check_precision(precision)
    layout = plan.layout
    rule = MaskRule.for_layout(layout, layout.seq_len, q_local.shape[-1], sparsity=sparsity,
                               block_size=plan.block_size, first_frame_sink=first_frame_sink, scale=scale,
                               share_batch_mask=share_batch_mask)
    choice = resolve_backend(backend, q_local.device)
    batch, heads, _, dim = q_local.shape
    kv_heads = k_local.shape[1]

    # ---- reshard: each row to the rank whose shard holds its permuted position (one all-to-all)
    sent = torch.cat([_rows(x.index_select(2, plan.send_index)) for x in (q_local, k_local, v_local)], dim=1)
    received = _all_to_all(sent, plan.recv_splits, plan.send_splits, group).index_select(0, plan.to_shard)
    widths = [batch * heads * dim, batch * kv_heads * dim, batch * kv_heads * dim]
    q_rows, k_rows, v_rows = received.split(widths, dim=1)
    q_shard = _bnsd(q_rows, batch, heads, dim)
    k_shard, v_shard = (_bnsd(x, batch, kv_heads, dim) for x in (k_rows, v_rows))
    chosen = prediction_backend(choice.obj or choice.spec, q_shard, k_shard, plan.block_size, precision, lse=True)

    # ---- mask: block means of every shard, gathered; the whole mask selected on every rank
    predictor = chosen.mask_predictor(q_local.dtype)
    means = torch.cat([_rows(rule.block_means(x, predictor)) for x in (q_shard, k_shard)], dim=1)
    counts = [blocks.numel() for blocks in plan.blocks]
    all_means = torch.empty((sum(counts), means.shape[1]), dtype=means.dtype, device=means.device)
    all_means.index_copy_(0, plan.dealt, torch.cat(_all_gather_rows(means, counts, group)))
    q_means, k_means = all_means.split([batch * heads * dim, batch * kv_heads * dim], dim=1)
    q_means, k_means = _bnsd(q_means, batch, heads, dim), _bnsd(k_means, batch, kv_heads, dim)
    if rule.share_batch_mask:
        q_means, k_means = q_means[:1], k_means[:1]
    parts = rule.select(pooled_scores(q_means, k_means), predictor)
    if rule.share_batch_mask:
        parts = tuple(x.expand(batch, *x.shape[1:]) for x in parts)
    mask = BlockMask.from_tuple((*parts, plan.block_size), layout.seq_len, layout.seq_len)
    if on_mask is not None:
        on_mask(mask)

    # ---- ring: the shards' k and v gathered; each step attends to one shard's kept blocks
    kv_rows = torch.cat([k_rows, v_rows], dim=1)
    shards = _all_gather_rows(kv_rows, plan.lengths, group)
    padded_q = None if plan.padded_rows is None or not plan.padded_rows.numel() else \
        q_local.index_select(2, plan.padded_rows)
    rows = mask.dense.index_select(2, plan.blocks[plan.rank])  # this rank's mask rows
    outs, lses, padded_outs, padded_lses = [], [], [], []
    for j, shard in enumerate(shards):
        k_j, v_j = (_bnsd(x, batch, kv_heads, dim) for x in shard.split(widths[1:], dim=1))
        if padded_q is not None:
            out, lse = _dense_part(padded_q, k_j, v_j, rule.scale)
            padded_outs.append(out)
            padded_lses.append(lse)
        step = rows.index_select(3, plan.blocks[j])
        if step.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(step.any()):
            continue  # no kept block: no launch (free to know on the CPU, outside a compiled graph)
        step_mask = BlockMask.from_dense(step, block_size=plan.block_size, q_len=plan.shard_len,
                                         kv_len=plan.lengths[j])
        out, lse = attention(choice, q_shard, k_j, v_j, step_mask, rule.scale, precision=precision,
                             chosen=chosen, return_lse=True)
        outs.append(out)
        lses.append(lse)
    out_shard, _ = merge_attention(outs, lses)  # every row keeps a block somewhere: never empty

    # ---- back: each output row to the rank holding its token (the inverse all-to-all)
    back = _all_to_all(_rows(out_shard).index_select(0, plan.to_buffer), plan.send_splits, plan.recv_splits, group)
    if padded_q is not None:
        back = torch.cat([back, _rows(merge_attention(padded_outs, padded_lses)[0])])
    out = back.index_select(0, plan.to_local).unflatten(1, (batch, heads, dim)).transpose(0, 1).contiguous()
    return out if tensor_layout == "BSND" else out.transpose(1, 2)  # [B, L, H, D] rows of this rank


def _check_group(group, plan: RingPlan) -> None:
    """``group`` must be a process group of ``plan.degree`` ranks in which this process is ``plan.rank``."""
    import torch.distributed as dist

    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {describe(group)}")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size != plan.degree or rank != plan.rank:
        raise ValueError(f"the plan is for rank {plan.rank} of {plan.degree}, but this process is rank {rank} of the "
                         f"{size} in group")


def _dense_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Dense attention of ``q [B, Hq, P, D]`` over ``k, v [B, Hkv, n, D]`` and its log-sum-exp (in float32 or wider)."""
    work = accumulation_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1).to(work) for x in (k, v))
    scores = (q.to(work) @ k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype), lse
