import math

import pytest
import torch

import rainfusion_core as rf


def naive_mask(q, k, layout, sparsity, block_size, sink, scale=None):
    """float64 RainFusion2.0 mask with per-block loops."""
    batch, q_heads, length, dim = q.shape
    group = q_heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    n = math.ceil(length / block_size)
    means = lambda x: torch.stack(  # noqa: E731
        [x[:, :, i * block_size : (i + 1) * block_size].double().mean(2) for i in range(n)], dim=2
    )
    qm, km = means(q), means(k)
    keep = max(1, math.ceil(n * (1 - sparsity)))
    mask = torch.zeros(batch, q_heads, n, n, dtype=torch.bool)
    for b in range(batch):
        for h in range(q_heads):
            probs = torch.softmax(qm[b, h] @ km[b, h // group].T * scale, dim=-1)
            kth = probs.sort(dim=-1, descending=True).values[:, keep - 1 : keep]
            mask[b, h] = probs >= kth
    forced = []
    if layout.text_len:
        forced += list(range(n - math.ceil(layout.text_len / block_size), n))
    if sink:
        forced += list(range(math.ceil(layout.frame_len / block_size)))
    for i in forced:
        mask[:, :, i, :] = True
        mask[:, :, :, i] = True
    return mask


CASES = [
    pytest.param(rf.VideoLayout(3, 8, 16), 32, 0.5, id="aligned-partial-free"),
    pytest.param(rf.VideoLayout(3, 10, 12), 32, 0.7, id="unaligned-partial-last-block"),
    pytest.param(rf.VideoLayout(4, 8, 8, text_len=20), 16, 0.8, id="text-head"),
    pytest.param(rf.VideoLayout(2, 9, 9, text_len=5, text_position="tail"), 16, 0.6, id="text-tail"),
    pytest.param(rf.VideoLayout(1, 16, 24), 32, 0.8, id="image"),
]


@pytest.mark.parametrize("layout, block_size, sparsity", CASES)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa2", "gqa4"])
def test_mask_matches_naive(layout, block_size, sparsity, heads):
    q = torch.randn(2, heads[0], layout.seq_len, 16, dtype=torch.float64)
    k = torch.randn(2, heads[1], layout.seq_len, 16, dtype=torch.float64)
    mask = rf.predict_block_mask(q, k, layout, sparsity=sparsity, block_size=block_size)
    expected = naive_mask(q, k, layout, sparsity, block_size, sink=layout.frames > 1)
    assert mask.dense.shape == expected.shape
    assert torch.equal(mask.dense, expected)


def test_keep_count_per_row_without_forced_blocks():
    layout = rf.VideoLayout(2, 16, 16)  # 512 tokens, 16 blocks of 32
    q, k = torch.randn(1, 3, 512, 32), torch.randn(1, 3, 512, 32)
    for sparsity, keep in [(0.0, 16), (0.5, 8), (0.8, 4), (0.95, 1), (0.99, 1)]:
        mask = rf.predict_block_mask(q, k, layout, sparsity=sparsity, block_size=32, first_frame_sink=False)
        assert (mask.kv_counts == keep).all(), sparsity


def test_ties_keep_more_blocks():
    layout = rf.VideoLayout(2, 8, 16)
    q = torch.randn(1, 1, 256, 16)
    k = torch.randn(1, 1, 32, 16).repeat(1, 1, 8, 1)  # every key block has the same mean
    mask = rf.predict_block_mask(q, k, layout, sparsity=0.9, block_size=32, first_frame_sink=False)
    assert mask.dense.all()


def test_sink_default_on_for_video_off_for_images():
    video, image = rf.VideoLayout(4, 8, 16), rf.VideoLayout(1, 32, 16)
    for layout, on in [(video, True), (image, False)]:
        q, k = torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
        mask = rf.predict_block_mask(q, k, layout, sparsity=0.9, block_size=32)
        sink_blocks = layout.frame_len // 32 if on else 0
        assert bool(mask.dense[:, :, :4, :].all()) == on  # first frame = 4 blocks
        if on:
            assert mask.dense[:, :, :, :sink_blocks].all()
    forced = rf.predict_block_mask(q, k, image, sparsity=0.9, block_size=32, first_frame_sink=True)
    assert forced.dense[:, :, :16].all() and forced.dense.all()  # image sink = whole image


def test_text_blocks_forced_as_rows_and_columns():
    layout = rf.VideoLayout(2, 8, 8, text_len=40)  # 168 tokens, blocks of 32 -> 6; text covers 2
    q, k = torch.randn(1, 1, 168, 16), torch.randn(1, 1, 168, 16)
    mask = rf.predict_block_mask(q, k, layout, sparsity=0.9, block_size=32, first_frame_sink=False)
    assert mask.dense[..., 4:, :].all() and mask.dense[..., :, 4:].all()


def test_block_means_average_partial_last_block():
    x = torch.randn(2, 3, 300, 8, dtype=torch.float64)
    means = rf.block_means(x, 128, torch.float64)
    assert means.shape == (2, 3, 3, 8)
    torch.testing.assert_close(means[:, :, 2], x[:, :, 256:].mean(2))
    torch.testing.assert_close(means[:, :, 0], x[:, :, :128].mean(2))


def test_block_means_of_strided_view():
    x = torch.randn(2, 300, 3, 8)
    torch.testing.assert_close(
        rf.block_means(x.transpose(1, 2), 64, torch.float32),
        rf.block_means(x.transpose(1, 2).contiguous(), 64, torch.float32),
    )


def test_masks_per_batch_item_and_shared():
    layout = rf.VideoLayout(2, 16, 16)
    q, k = torch.randn(2, 2, 512, 16), torch.randn(2, 2, 512, 16)
    own = rf.predict_block_mask(q, k, layout, sparsity=0.8, block_size=32)
    assert not torch.equal(own.dense[0], own.dense[1])
    shared = rf.predict_block_mask(q, k, layout, sparsity=0.8, block_size=32, share_batch_mask=True)
    assert torch.equal(shared.dense[1], own.dense[0]) and torch.equal(shared.dense[0], own.dense[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_prediction_runs_in_every_dtype(dtype):
    layout = rf.VideoLayout(2, 8, 16)
    q, k = torch.randn(1, 2, 256, 16, dtype=dtype), torch.randn(1, 2, 256, 16, dtype=dtype)
    mask = rf.predict_block_mask(q, k, layout, sparsity=0.5, block_size=32)
    assert mask.dense.shape == (1, 2, 8, 8) and mask.kv_counts.dtype == torch.int32


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sparsity=1.0), ValueError, "sparsity must be in"),
        (dict(sparsity=-0.1), ValueError, "sparsity must be in"),
        (dict(sparsity="0.5"), TypeError, "sparsity must be a float"),
        (dict(sparsity=0.5, block_size=0), ValueError, "block_size"),
        (dict(sparsity=0.5, scale=-1.0), ValueError, "scale"),
    ],
)
def test_prediction_argument_errors(kwargs, error, match):
    layout = rf.VideoLayout(2, 8, 8)
    q = torch.randn(1, 2, 128, 16)
    with pytest.raises(error, match=match):
        rf.predict_block_mask(q, q, layout, **kwargs)


def test_prediction_sequence_mismatch():
    q = torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match=r"q sequence length \(100\) must equal layout.seq_len \(128\)"):
        rf.predict_block_mask(q, q, rf.VideoLayout(2, 8, 8), sparsity=0.5)
