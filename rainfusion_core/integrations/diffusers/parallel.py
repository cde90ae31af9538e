"""RainFusion under diffusers' context parallelism: Ulysses only.

With ``ContextParallelConfig(ulysses_degree=N)`` each rank holds ``S / N`` tokens of
every head. The sparse layer exchanges them (all-to-all, diffusers' own helper) so
that each rank holds the whole sequence of ``H / N`` heads, runs the unchanged
single-device path on it (permutation, prediction, kernel: per head, so every head's
mask is the one a single GPU computes) and exchanges the output back.

diffusers splits a joint text + video sequence per stream (Flux, Qwen-Image: each
rank holds ``[text chunk, video chunk]``), so after the exchange the tokens are in
rank order, not in the model's order; :func:`gathered_order` puts them back.
"""
from __future__ import annotations

import torch


def context_parallel(parallel_config):
    """The ``ContextParallelConfig`` of a processor's parallel config, or ``None``."""
    return None if parallel_config is None else getattr(parallel_config, "context_parallel_config", None)


def parallel_problem(parallel_config, heads: int | None) -> str | None:
    """Why RainFusion cannot run under this parallel config, or ``None`` when it can."""
    cp = context_parallel(parallel_config)
    if cp is None:
        return None
    if (cp.ring_degree or 1) > 1:
        return (f"ring attention (ring_degree={cp.ring_degree}) is not supported: it needs a mask that follows the "
                "key shards; RainFusion runs under Ulysses (ContextParallelConfig(ulysses_degree=N), ring_degree=1)")
    if getattr(cp, "ulysses_anything", False):
        return ("ulysses_anything (sequences not divisible by the degree) is not supported: choose a resolution whose "
                "token count divides by ulysses_degree")
    degree = cp.ulysses_degree or 1
    if heads is not None and heads % degree:
        return f"{heads} attention heads do not divide among ulysses_degree={degree} ranks"
    return None


def check_parallel_config(parallel_config, heads: int | None) -> None:
    problem = parallel_problem(parallel_config, heads)
    if problem is not None:
        raise ValueError(f"RainFusion under context parallelism: {problem}")


def exchange(x: torch.Tensor, cp, to_heads: bool) -> torch.Tensor:
    """``[B, S/N, H, D] -> [B, S, H/N, D]`` (``to_heads``) or back, over the Ulysses group."""
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    group = cp._ulysses_mesh.get_group()
    scatter, gather = (2, 1) if to_heads else (1, 2)
    return _all_to_all_dim_exchange(x.contiguous(), scatter_idx=scatter, gather_idx=gather, group=group)


def gathered_order(length: int, degree: int, video_len: int, text_position: str | None,
                   device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(order, inverse)``: ``order[i]`` is the gathered position of model position ``i``,
    ``inverse[g]`` the model position of gathered position ``g``; ``None`` when they agree.

    After the exchange, rank ``r``'s chunk ``[r * S/N, (r + 1) * S/N)`` holds its local
    sequence: ``[text / N, video / N]`` (text first) or ``[video / N, text / N]``.
    """
    text_len = length - video_len
    if text_len == 0 or degree == 1:
        return None
    if text_len % degree or video_len % degree:
        raise ValueError(f"{video_len} video and {text_len} text tokens do not split evenly among {degree} ranks")
    local, text_local, video_local = length // degree, text_len // degree, video_len // degree
    rank = torch.arange(degree).repeat_interleave(local)
    within = torch.arange(length) % local
    if text_position == "head":
        is_text = within < text_local
        model = torch.where(is_text, rank * text_local + within, text_len + rank * video_local + within - text_local)
    else:
        is_text = within >= video_local
        model = torch.where(is_text, video_len + rank * text_local + within - video_local, rank * video_local + within)
    order = torch.empty(length, dtype=torch.long)
    order[model] = torch.arange(length)
    return order.to(device), model.to(device)
