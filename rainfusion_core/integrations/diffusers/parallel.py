"""RainFusion under diffusers' context parallelism: Ulysses, ring, and both (unified).

diffusers splits the sequence over all ``ring_degree * ulysses_degree`` ranks (rank
``ring_rank * ulysses_degree + ulysses_rank`` holds chunk number that). With Ulysses the
sparse layer exchanges the chunks (all-to-all, diffusers' own helper) so that each rank
holds ``H / ulysses_degree`` heads of its ring group's chunks. Without ring, that is the
whole sequence: the unchanged single-device path runs on it (permutation, prediction,
kernel: per head, so every head's mask is the one a single GPU computes). With ring,
``rainfusion_core.ring`` spreads the call over the ring group (its module docstring
has the steps), with the mask every rank predicts from all ranks' block means.

diffusers splits a joint text + video sequence per stream (Flux, Qwen-Image: each
rank holds ``[text chunk, video chunk]``), so the rows a rank holds are not one run of the
model's positions; :func:`held_positions` says which they are.
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
    if getattr(cp, "ring_anything", False):
        return ("ring_anything (sequences not divisible by the degree) is not supported: choose a resolution whose "
                "token count divides by ring_degree")
    if getattr(cp, "ulysses_anything", False):
        return ("ulysses_anything (sequences not divisible by the degree) is not supported: choose a resolution whose "
                "token count divides by ulysses_degree")
    degree = cp.ulysses_degree or 1
    if heads is not None and heads % degree:
        return (f"{heads} attention heads do not divide among ulysses_degree={degree} ranks (ring_degree spreads "
                "the sequence without splitting heads)")
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


def held_positions(length: int, video_len: int, text_position: str | None, joint: bool, ring: int,
                   ulysses: int) -> torch.Tensor:
    """``[ring, length / ring]``: the model position of each row a ring rank holds after the Ulysses exchange.

    Rank ``f = ring_rank * ulysses + ulysses_rank`` of the flattened mesh gets chunk ``f``
    of each stream diffusers splits: the joint sequence whole (``joint``, or no text), or
    ``[text / N, video / N]`` (text at the head) or ``[video / N, text / N]``. The Ulysses
    exchange then gives each rank its ring group's chunks in Ulysses-rank order. With
    ``ring == 1`` the row is the model position of each gathered position.
    """
    world = ring * ulysses
    text_len = length - video_len
    if text_len == 0 or joint:
        if length % world:
            raise ValueError(f"{length} tokens do not split evenly among {world} ranks")
        return torch.arange(length).view(ring, length // ring)
    if text_len % world or video_len % world:
        raise ValueError(f"{video_len} video and {text_len} text tokens do not split evenly among {world} ranks")
    head = text_position == "head"
    text = torch.arange(text_len) + (0 if head else video_len)
    video = torch.arange(video_len) + (text_len if head else 0)
    streams = [text.view(world, -1), video.view(world, -1)]
    return torch.cat(streams if head else streams[::-1], dim=1).reshape(ring, length // ring)
