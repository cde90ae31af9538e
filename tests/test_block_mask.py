import warnings

import pytest
import torch

import rainfusion_core as rf
from helpers import random_dense


def test_from_dense_index_view_is_ascending_and_left_packed():
    dense = random_dense(2, 3, 5, 7, density=0.4, empty_rows=[(0, 0, 2)])
    mask = rf.BlockMask.from_dense(dense, block_size=16, q_len=70, kv_len=100)
    assert mask.kv_counts.dtype == torch.int32 and mask.kv_indices.dtype == torch.int32
    for b in range(2):
        for h in range(3):
            for i in range(5):
                kept = dense[b, h, i].nonzero().flatten().tolist()
                count = int(mask.kv_counts[b, h, i])
                assert count == len(kept)
                assert mask.kv_indices[b, h, i, :count].tolist() == kept
    assert mask.kv_counts[0, 0, 2] == 0


def test_density_counts_kept_tiles():
    dense = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    dense[0, 0, :, 0] = True
    mask = rf.BlockMask.from_dense(dense, block_size=8, q_len=32, kv_len=32)
    assert mask.density == pytest.approx(0.25)
    ragged = rf.BlockMask.from_dense(dense, block_size=8, q_len=32, kv_len=25)  # last key block has 1 token
    assert ragged.token_density() == pytest.approx(8 / 25)


@pytest.mark.parametrize(
    "shape, q_len, kv_len, match",
    [
        ((1, 1, 3, 4), 16, 32, r"dense must be torch.bool of shape \(1, 1, 2, 4\)"),
        ((1, 1, 2, 4), 16, 33, r"shape \(1, 1, 2, 5\)"),
        ((1, 2, 4), 16, 32, r"4-D tensor"),
    ],
)
def test_shapes_are_validated_against_lengths(shape, q_len, kv_len, match):
    with pytest.raises(ValueError, match=match):
        rf.BlockMask.from_dense(torch.ones(shape, dtype=torch.bool), block_size=8, q_len=q_len, kv_len=kv_len)


def test_invalid_block_size():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        rf.BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=0, q_len=1, kv_len=1)


@pytest.mark.parametrize("q_len, kv_len", [(256, 320), (203, 300), (113, 113)])
def test_flex_attention_conversion_matches_torch_backend(q_len, kv_len):
    from torch.nn.attention.flex_attention import flex_attention

    bs = 64
    q = torch.randn(2, 2, q_len, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, kv_len, 16, dtype=torch.float64), torch.randn(2, 2, kv_len, 16, dtype=torch.float64)
    dense = random_dense(2, 2, -(-q_len // bs), -(-kv_len // bs), empty_rows=[(1, 0, 1)])
    mask = rf.BlockMask.from_dense(dense, block_size=bs, q_len=q_len, kv_len=kv_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        flex = flex_attention(q, k, v, block_mask=mask.to_flex_block_mask())
    ours = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(flex, ours, rtol=1e-10, atol=1e-10)
    assert ours[1, 0, bs : 2 * bs].abs().max() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_hand_built_mask_is_checked_with_one_host_synchronisation():
    made = rf.BlockMask.from_dense(random_dense(1, 2, 8, 8).cuda(), block_size=64, q_len=512, kv_len=512)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rf.BlockMask(made.dense, made.kv_counts, made.kv_indices, 64, 512, 512)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
