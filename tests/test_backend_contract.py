"""The Backend contract: required and optional parts, and the deprecated spellings of the optional hooks."""
import re
import warnings

import pytest
import torch

import rainfusion_core as rf
from rainfusion_core.backend import MaskPredictor
from rainfusion_core.backends.torch_backend import masked_attention
from rainfusion_core.selection import block_means, select_blocks

LAYOUT = rf.VideoLayout(3, 8, 8)


def _qkv():
    return (torch.randn(1, 2, LAYOUT.seq_len, 16) for _ in range(3))


class Minimal(rf.Backend):
    name, device_types = "contract_minimal", ("cpu",)

    def forward(self, q, k, v, block_mask, scale):
        return masked_attention(q, k, v, block_mask, scale)


def test_a_backend_needs_only_forward_and_has_no_optional_capabilities():
    backend = Minimal()
    assert backend.mask_predictor(torch.float32) is None
    assert backend.model_order_attention() is None
    assert backend.unavailable_reason() is None and backend.unsupported_reasons(None, None, None, None) == []
    q, k, v = _qkv()
    want = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend="torch")
    torch.testing.assert_close(rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=backend),
                               want, rtol=0, atol=0)


def test_forward_is_required():
    class Empty(rf.Backend):
        name, device_types = "contract_empty", ("cpu",)

    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="does not implement forward"):
        rf.sparse_attention(q, k, v, LAYOUT, block_size=32, backend=Empty())


class Counting(MaskPredictor):
    def __init__(self):
        self.calls = 0

    def block_means(self, x, block_size, order):
        self.calls += 1
        return block_means(x, block_size, torch.float32, order)

    def select_blocks(self, scores, **kwargs):
        self.calls += 1
        return select_blocks(scores, **kwargs)


def test_a_mask_predictor_is_used_by_prediction_and_gives_the_reference_mask():
    predictor = Counting()

    class WithPredictor(Minimal):
        name = "contract_predictor"

        def mask_predictor(self, dtype):
            return predictor if dtype == torch.float32 else None

    q, k, _ = _qkv()
    got = rf.predict_block_mask(q, k, LAYOUT, sparsity=0.5, block_size=32, backend=WithPredictor())
    assert predictor.calls == 3  # q means, k means, selection
    want = rf.predict_block_mask(q, k, LAYOUT, sparsity=0.5, block_size=32, backend="torch")
    assert torch.equal(got.dense, want.dense) and torch.equal(got.kv_counts, want.kv_counts)


def test_model_order_attention_is_used_when_offered():
    seen = []

    class ReadsThroughOrder(Minimal):
        name = "contract_model_order"

        def model_order_attention(self):
            def run(q, k, v, block_mask, scale, order, out):
                seen.append(order.shape)
                out.index_copy_(2, order, self.forward(*(x.index_select(2, order) for x in (q, k, v)),
                                                       block_mask, scale))
            return run

    q, k, v = _qkv()
    got = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=ReadsThroughOrder())
    assert seen == [torch.Size([LAYOUT.seq_len])]
    torch.testing.assert_close(got, rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32,
                                                        backend="torch"), rtol=0, atol=0)


def test_a_model_order_function_that_leaves_rows_unwritten_gives_nan_not_stale_memory():
    class WritesHalf(Minimal):
        name = "contract_writes_half"

        def model_order_attention(self):
            def run(q, k, v, block_mask, scale, order, out):
                out[:, :, : out.shape[2] // 2] = 0.5  # the rest never written
            return run

    q, k, v = _qkv()
    got = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=WritesHalf())
    half = LAYOUT.seq_len // 2
    assert (got[:, :, :half] == 0.5).all() and got[:, :, half:].isnan().all()


@pytest.mark.parametrize("bad, message", [
    (lambda d, c, i: (d[..., :-1], c, i), "returned dense as a 4-D torch.bool tensor of shape"),
    (lambda d, c, i: (d, c.long(), i), "returned kv_counts as a 3-D torch.int64 tensor"),
    (lambda d, c, i: (d, c), "returned tuple from select_blocks(); expected (dense, kv_counts, kv_indices)"),
])
def test_a_mask_predictor_returning_the_wrong_shape_is_named(bad, message):
    class Predictor(MaskPredictor):
        def block_means(self, x, block_size, order):
            return block_means(x, block_size, torch.float32, order)

        def select_blocks(self, scores, **kw):
            return bad(*select_blocks(scores, **kw))

    class Predicts(Minimal):
        name = "contract_bad_predictor"

        def mask_predictor(self, dtype):
            return Predictor()

    q, k, v = _qkv()
    with pytest.raises(rf.BackendError, match=re.escape("mask predictor Predictor " + message)):
        rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=Predicts())


def test_the_deprecated_spellings_still_work_and_warn():
    class Legacy(Minimal):
        name = "contract_legacy"
        fused_prediction_dtypes = (torch.float32,)
        calls = []

        def block_means(self, x, block_size, order):
            self.calls.append("means")
            return block_means(x, block_size, torch.float32, order)

        def select_blocks(self, scores, **kwargs):
            self.calls.append("select")
            return select_blocks(scores, **kwargs)

        def forward_reordered(self, q, k, v, block_mask, scale, order, out):
            self.calls.append("reordered")
            super().forward_reordered(q, k, v, block_mask, scale, order, out)

    backend = Legacy()
    q, k, v = _qkv()
    with pytest.warns(DeprecationWarning) as caught:
        got = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=backend)
    messages = " ".join(str(w.message) for w in caught)
    assert "define mask_predictor() instead" in messages and "define model_order_attention() instead" in messages
    assert backend.calls == ["means", "means", "select", "reordered"]
    torch.testing.assert_close(got, rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32,
                                                        backend="torch"), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per backend and hook
        rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=backend)
