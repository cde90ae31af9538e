"""The mask rule is one object (``rainfusion_core.mask_rule.MaskRule``), passed whole to every predictor.

Replacing the rule's selection in that one place changes the mask every entry point
predicts: ``sparse_attention``, ``predict_block_mask``, ``plan_sparse_attention`` and the
quality evaluator, on the CPU's eager predictor and on a backend's own predictor.
"""
import pytest
import torch

import rainfusion_core as rf
from rainfusion_core.backend import Backend, MaskPredictor
from rainfusion_core.backends.torch_backend import masked_attention
from rainfusion_core.mask_rule import MaskRule, keep_blocks
from rainfusion_core.quality import evaluate
from rainfusion_core.selection import block_means, select_blocks
from rainfusion_core.synthetic import video_like_qkv

LAYOUT = rf.VideoLayout(3, 8, 16, text_len=70)  # 454 tokens: 4 blocks of 128, the last partial


def test_the_budget_follows_the_layout():
    rule = MaskRule.for_layout(LAYOUT, LAYOUT.seq_len, 64, sparsity=0.8, block_size=128, first_frame_sink=None,
                               scale=None)
    assert (rule.keep, rule.sink_blocks, rule.text_blocks) == (1, 1, 1) and rule.scale == 64 ** -0.5
    assert rule.at_sparsity(0.25, LAYOUT.seq_len).keep == 3 == keep_blocks(4, 0.25)
    assert MaskRule.for_layout(LAYOUT, LAYOUT.seq_len, 64, sparsity=0.8, block_size=128, first_frame_sink=False,
                               scale=0.5).forced_blocks == 1
    with pytest.raises(ValueError, match="sparsity"):
        MaskRule.for_layout(LAYOUT, LAYOUT.seq_len, 64, sparsity=1.0, block_size=128, first_frame_sink=None,
                            scale=None)


def _diagonal(self, scores, predictor=None):
    """Another rule: each query block keeps its own key block only."""
    eye = torch.eye(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device)
    made = rf.BlockMask.from_dense(eye.expand(scores.shape).clone(), block_size=1, q_len=scores.shape[-2],
                                   kv_len=scores.shape[-1])
    return made.dense, made.kv_counts, made.kv_indices


def test_changing_the_rule_in_its_one_place_changes_every_entry_point(monkeypatch):
    q, k, v = video_like_qkv(LAYOUT, 2, 32, seed=1)
    monkeypatch.setattr(MaskRule, "select", _diagonal)
    eye = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
    plan = rf.plan_sparse_attention(q, k, LAYOUT, sparsity=0.5)
    assert torch.equal(plan.block_mask.dense, eye)
    permuted = [plan.permutation.apply(x, 2) for x in (q, k)]
    assert torch.equal(rf.predict_block_mask(*permuted, LAYOUT, sparsity=0.5).dense, eye)
    out = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, min_tokens=0)
    assert torch.equal(out, plan.run(q, k, v))  # the plan's mask is the diagonal
    report = evaluate(q, k, v, LAYOUT, sparsities=(0.5,), variants=("rainfusion",), block_size=128)
    assert report.get("rainfusion", 0.5).density == pytest.approx(0.25)  # the diagonal: 4 of 16 tiles


class _Recording(MaskPredictor):
    def __init__(self):
        self.asked = []

    def block_means(self, x, block_size, order):
        return block_means(x, block_size, torch.float32, order)

    def select_blocks(self, scores, **keywords):
        self.asked.append(keywords)
        return select_blocks(scores, **keywords)


class _WithPredictor(Backend):
    name = "rule_recorder"
    device_types = ("cpu",)
    priority = 95

    def __init__(self):
        self.predictor = _Recording()

    def forward(self, q, k, v, block_mask, scale):
        return masked_attention(q, k, v, block_mask, scale)

    def mask_predictor(self, dtype):
        return self.predictor


def test_a_backends_predictor_gets_the_rule_whole():
    q, k, v = video_like_qkv(LAYOUT, 2, 32, seed=2)
    backend = _WithPredictor()
    with rf.scoped_backends(backend):
        rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, backend="rule_recorder")
    rule = MaskRule.for_layout(LAYOUT, LAYOUT.seq_len, 32, sparsity=0.5, block_size=128, first_frame_sink=None,
                               scale=None)
    assert backend.predictor.asked == [rule.selection_keywords()]
