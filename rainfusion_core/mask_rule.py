"""The RainFusion2.0 mask rule as one object: a call's resolved parameters and its reference selection.

A :class:`MaskRule` is made once per call from the user's arguments
(:meth:`MaskRule.for_layout`) and passed whole to every place that predicts a
mask: the prediction op, each backend's predictor, the quality evaluator. It holds
the budget (``keep`` key blocks per row by score, the forced first-frame and text
blocks), the pooled scores' scale, and defines the prediction: block means of the
permuted q and k, pooled scores ``q̄ k̄ᵀ``, per-row selection. The eager definitions of
those steps live in ``rainfusion_core.selection``; a backend's
:class:`~rainfusion_core.backend.MaskPredictor` replaces the two heavy ones with
kernels that must give the same result.

Changing the rule means this module, ``selection.py`` (the eager steps) and the
kernels that implement the steps (``backends/triton/prediction.py``); nothing else
computes a budget or selects blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ._checks import check_block_size, check_bool, check_optional_bool, check_sparsity, default_scale
from .block_mask import num_blocks
from .dtypes import accumulation_dtype
from .layout import VideoLayout
from .selection import block_means, check_predicted, pooled_scores, select_blocks


def keep_blocks(kv_blocks: int, sparsity: float) -> int:
    """Key blocks each row keeps by score at ``sparsity`` (before the forced sink and text blocks)."""
    return min(kv_blocks, max(1, math.ceil(kv_blocks * (1.0 - sparsity))))


@dataclass(frozen=True)
class MaskRule:
    """The RainFusion2.0 mask of one call, resolved: what prediction needs, nothing else.

    Invariants (made so by :meth:`for_layout`): ``block_size >= 1``; ``1 <= keep <= NK``
    for the call's ``NK`` key blocks; ``sink_blocks`` and ``text_blocks`` count the first
    frame's and the text's blocks (forced as whole rows and columns); ``scale`` is the
    pooled scores' softmax scale.
    """

    block_size: int
    scale: float  # of the pooled scores
    keep: int  # key blocks kept per row before the forced ones
    sink_blocks: int  # first-frame blocks forced as whole rows and columns
    text_blocks: int  # text blocks forced likewise
    share_batch_mask: bool = False  # one mask, predicted from the first batch item, for the whole batch

    @classmethod
    def for_layout(cls, layout: VideoLayout, kv_len: int, head_dim: int, *, sparsity, block_size,
                   first_frame_sink, scale, share_batch_mask=False) -> "MaskRule":
        """The rule of a call on ``layout`` with ``kv_len`` keys of ``head_dim``, its arguments checked."""
        sparsity = check_sparsity(sparsity)
        block_size = check_block_size(block_size)
        if check_optional_bool("first_frame_sink", first_frame_sink) is None:
            first_frame_sink = layout.frames > 1  # the sink is on by default for videos
        return cls(
            block_size=block_size,
            scale=default_scale(scale, head_dim),
            keep=keep_blocks(num_blocks(kv_len, block_size), sparsity),
            sink_blocks=num_blocks(layout.frame_len, block_size) if first_frame_sink else 0,
            text_blocks=num_blocks(layout.text_len, block_size),
            share_batch_mask=check_bool("share_batch_mask", share_batch_mask),
        )

    def at_sparsity(self, sparsity: float, kv_len: int) -> "MaskRule":
        """The same rule with the budget of ``sparsity`` (a per-step sparsity known when the call runs)."""
        return replace(self, keep=keep_blocks(num_blocks(kv_len, self.block_size), sparsity))

    @property
    def forced_blocks(self) -> int:
        """Blocks every row keeps whatever the scores: the first frame's and the text's."""
        return self.sink_blocks + self.text_blocks

    def selection_keywords(self) -> dict:
        """The keywords of :meth:`MaskPredictor.select_blocks` (and of ``selection.select_blocks``)."""
        return dict(scale=self.scale, keep=self.keep, sink_blocks=self.sink_blocks, text_blocks=self.text_blocks)

    # ------------------------------------------------------------------ the prediction
    def scores(self, q: torch.Tensor, k: torch.Tensor, order: torch.Tensor | None = None,
               predictor=None) -> torch.Tensor:
        """Pooled scores ``q̄ k̄ᵀ`` (unscaled, float32 or wider) ``[B, Hq, NQ, NK]`` of ``q [B, Hq, S, D]``,
        ``k [B, Hkv, S, D]`` read through ``order`` (``None``: as they are)."""
        return pooled_scores(self.block_means(q, predictor, order), self.block_means(k, predictor, order))

    def block_means(self, x: torch.Tensor, predictor=None, order: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, H, NB, D]`` means of each block of ``x [B, H, S, D]`` (read through ``order``): the
        predictor's kernel, or for ``None`` the eager definition, accumulated in float32 or wider."""
        if predictor is None:
            return block_means(x, self.block_size, accumulation_dtype(x.dtype), order)
        return predictor.block_means(x, self.block_size, order)

    def select(self, scores: torch.Tensor, predictor=None):
        """``(dense, kv_counts, kv_indices)`` of pooled ``scores``: the reference selection, or the
        predictor's kernel (its output checked, the predictor named when it is wrong)."""
        if predictor is None:
            return select_blocks(scores, **self.selection_keywords())
        parts = predictor.select_blocks(scores, **self.selection_keywords())
        check_predicted(predictor, parts, scores)
        return parts

    def predict(self, q: torch.Tensor, k: torch.Tensor, order: torch.Tensor | None, predictor=None):
        """``(dense, kv_counts, kv_indices)`` of the mask of ``q``, ``k`` (read through ``order``):
        block means, pooled scores, selection; on ``predictor``'s kernels (``Backend.mask_predictor``)
        or, for ``None``, the eager definitions of ``rainfusion_core.selection``."""
        return self.select(self.scores(q, k, order, predictor), predictor)
