"""One strict boolean and one strict index check, wherever the library takes them; sizes bounded."""
import pytest
import torch

import rainfusion_core as rf

LAYOUT = rf.VideoLayout(3, 8, 16)


def _qkv():
    return (torch.randn(1, 2, LAYOUT.seq_len, 32) for _ in range(3))


@pytest.mark.parametrize("value", ["False", 0, 1, None, "yes"])
def test_share_batch_mask_takes_only_true_or_false(value):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"share_batch_mask must be True or False, got {value!r}"):
        rf.sparse_attention(q, k, v, LAYOUT, share_batch_mask=value)
    with pytest.raises(ValueError, match="share_batch_mask must be True or False"):
        rf.predict_block_mask(q, k, LAYOUT, sparsity=0.5, share_batch_mask=value)


def test_block_size_is_bounded_before_anything_is_allocated():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"block_size must be at most 2\*\*30"):
        rf.sparse_attention(q, k, v, LAYOUT, block_size=2 ** 63)


@pytest.mark.parametrize("layers, message", [
    ([True], "layers must hold non-negative ints or layer names, got True"),
    ([0.0], "layers must hold non-negative ints or layer names, got 0.0"),
    ([-1], "layers must hold non-negative ints or layer names, got -1"),
    ("0", "layers must be None or a list of ints or names, got a str"),
    ((i for i in range(2)), "layers must be None or a list of ints or names, got a generator"),
])
def test_layers_are_checked_strictly(layers, message):
    pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
    from helpers import tiny_wan
    from rainfusion_core.integrations.diffusers import apply_rainfusion

    model = tiny_wan()
    before = [block.attn1.processor for block in model.blocks]
    with pytest.raises((TypeError, ValueError), match=message):
        apply_rainfusion(model, layers=layers)
    assert [block.attn1.processor for block in model.blocks] == before  # nothing installed


def test_a_mask_on_the_meta_device_gets_a_clear_error():
    meta = dict(dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="its tensors are on the meta device, which holds none"):
        rf.BlockMask(torch.ones(1, 2, 3, 3, **meta), torch.ones(1, 2, 3, dtype=torch.int32, device="meta"),
                     torch.ones(1, 2, 3, 3, dtype=torch.int32, device="meta"), 128, 384, 384)
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 3, 3, **meta), block_size=128, q_len=384, kv_len=384)
    with pytest.raises(ValueError, match="BlockMask.density: the mask is on the meta device"):
        mask.density
