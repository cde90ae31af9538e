"""One ring attention call of a diffusers layer, as a custom op that ``torch.compile`` sees whole.

The plan of a ring call (``rainfusion_core.ring.RingPlan``) is index bookkeeping made on the
host. The op ``rainfusion::diffusers_ring_attention`` takes what determines it as integers
(the split, the rank, the text padding's pattern) and finds or makes it when it runs, so a
compiled graph never builds it (``compile_repeated_blocks(fullgraph=True)`` has no graph break,
first call included) and the collectives run inside the op. Eager calls run the op's body
directly, as the library's other ops do (``ops.runs_directly``), and tally each mask.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...caching import may_cache
from ...layout import VideoLayout
from ...ops import _no_backward, layout_args, runs_directly
from ...precision import DEFAULT_PRECISION
from ...ring import RingPlan, ring_sparse_attention
from .parallel import held_positions

_PLANS: dict = {}
_PLANS_SIZE = 256


def _plan(layout: VideoLayout, split: list[int], keep: torch.Tensor | None, pattern: list[bool],
          block_size: int, device) -> RingPlan:
    """The plan of rank ``split[5]`` for this split (``held_positions``' arguments) and padding pattern, cached."""
    length, video_len, joint, ring, ulysses, rank = split
    key = (layout, tuple(split), tuple(pattern), block_size, device)
    plan = _PLANS.get(key)
    if plan is None:
        held = held_positions(length, video_len, layout.text_position, bool(joint), ring, ulysses)
        plan = RingPlan.build(layout, degree=ring, rank=rank, block_size=block_size, held=held, keep=keep,
                              device=device)
        if may_cache(torch.device(device)):
            if len(_PLANS) >= _PLANS_SIZE:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def _body(q, k, v, keep, layout: list[int], split: list[int], pattern: list[bool], group, block_size: int,
          sparsity: float, first_frame_sink: Optional[bool], scale: Optional[float], backend: Optional[str],
          precision: str,
          on_mask=None) -> torch.Tensor:
    frames, height, width, text_len, tail = layout
    sparse_layout = VideoLayout(frames, height, width, text_len=text_len, text_position="tail" if tail else "head")
    plan = _plan(sparse_layout, split, keep, pattern, block_size, q.device)
    return ring_sparse_attention(q, k, v, plan, group=group, sparsity=sparsity, first_frame_sink=first_frame_sink,
                                 scale=scale, backend=backend, precision=precision, tensor_layout="BSND",
                                 on_mask=on_mask)


@torch.library.custom_op("rainfusion::diffusers_ring_attention", mutates_args=())
def diffusers_ring_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    layout: list[int],
    split: list[int],
    pattern: list[bool],
    group_name: str,
    block_size: int,
    sparsity: float,
    first_frame_sink: Optional[bool],
    scale: Optional[float],
    backend: Optional[str],
    precision: str = DEFAULT_PRECISION,
    step_sparsity: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Ring attention of this rank's rows ``[B, L, H, D]``; ``split`` is ``[length, video length, joint, ring,
    ulysses, rank]``, ``pattern`` which text tokens are real (empty: all), ``keep`` their sequence positions."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    if step_sparsity is not None:
        sparsity = float(step_sparsity)
    return _body(q, k, v, keep, layout, split, pattern, _resolve_process_group(group_name), block_size, sparsity,
                 first_frame_sink, scale, backend, precision)


@diffusers_ring_attention_op.register_fake
def _(q, k, v, keep, layout, split, pattern, group_name, block_size, sparsity, first_frame_sink, scale, backend,
      precision=DEFAULT_PRECISION, step_sparsity=None):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


diffusers_ring_attention_op.register_autograd(_no_backward)


def ring_attention(q, k, v, layout: VideoLayout, split: list[int], text, group, *, block_size: int, sparsity,
                   first_frame_sink, scale, backend, precision, step_sparsity=None, on_mask=None) -> torch.Tensor:
    """Ring attention of a layer's rows ``[B, L, H, D]`` (``text``: a ``TextGroup`` of padded text, or ``None``):
    the op's body in eager mode (``on_mask`` sees each mask), the op under tracing."""
    keep, pattern = (None, []) if text is None else (text.keep, list(text.pattern))
    if step_sparsity is not None or not runs_directly(q, k, v):
        if not (backend is None or isinstance(backend, str)):
            raise ValueError("a Backend object cannot cross the op boundary: under torch.compile, name a registered "
                             "backend")
        return diffusers_ring_attention_op(q, k, v, keep, layout_args(layout), split, pattern, group.group_name,
                                           block_size, float(sparsity), first_frame_sink, scale, backend, precision,
                                           step_sparsity)
    return _body(q, k, v, keep, layout_args(layout), split, pattern, group, block_size, sparsity, first_frame_sink,
                 scale, backend, precision, on_mask)
