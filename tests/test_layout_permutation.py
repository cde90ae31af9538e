import pytest
import torch

import rainfusion_core as rf


def naive_permutation(frames, height, width, text_len=0, text_position="head"):
    """The rf_v2 order of docs/design.md, token by token with Python loops."""
    hw = height * width
    aligned = height % 8 == 0 and width % 8 == 0
    mh, mw = height - height % 8, width - width % 8
    video = []
    for f in range(frames):
        base = f * hw
        if not aligned and f == 0:
            video += [base + i for i in range(hw)]
            continue
        th, tw = (height, width) if aligned else (mh, mw)
        for hn in range(th // 8):
            for wn in range(tw // 8):
                for hb in range(8):
                    for wb in range(8):
                        video.append(base + (hn * 8 + hb) * width + wn * 8 + wb)
        if not aligned:
            video += [base + r * width + c for r in range(mh, height) for c in range(width)]
            video += [base + r * width + c for r in range(mh) for c in range(mw, width)]
    if text_position == "head":
        return [i + text_len for i in video] + list(range(text_len))
    return video + [frames * hw + i for i in range(text_len)]


LAYOUTS = [
    pytest.param(dict(frames=1, height=8, width=8), id="image-8x8"),
    pytest.param(dict(frames=2, height=16, width=24), id="aligned-2x16x24"),
    pytest.param(dict(frames=3, height=10, width=12), id="unaligned-3x10x12"),
    pytest.param(dict(frames=2, height=9, width=2), id="width-below-8"),
    pytest.param(dict(frames=3, height=3, width=20), id="height-below-8"),
    pytest.param(dict(frames=2, height=5, width=6), id="both-below-8"),
    pytest.param(dict(frames=4, height=17, width=23), id="unaligned-4x17x23"),
    pytest.param(dict(frames=1, height=10, width=12), id="image-unaligned"),
    pytest.param(dict(frames=3, height=8, width=16, text_len=7), id="text-head"),
    pytest.param(dict(frames=3, height=9, width=16, text_len=13, text_position="tail"), id="text-tail"),
    pytest.param(dict(frames=21, height=30, width=52), id="wan-480p"),
]


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_permutation_matches_naive_order(kwargs):
    layout = rf.VideoLayout(**kwargs)
    perm = rf.build_permutation(layout)
    assert perm.indices.dtype == torch.long and perm.indices.shape == (layout.seq_len,)
    assert perm.indices.tolist() == naive_permutation(**kwargs)


@pytest.mark.parametrize("kwargs", LAYOUTS)
def test_permutation_is_a_bijection_with_its_inverse(kwargs):
    layout = rf.VideoLayout(**kwargs)
    perm = rf.build_permutation(layout)
    assert torch.equal(perm.indices.sort().values, torch.arange(layout.seq_len))
    assert torch.equal(perm.indices[perm.inverse], torch.arange(layout.seq_len))
    x = torch.randn(2, layout.seq_len, 3)
    assert torch.equal(perm.undo(perm.apply(x, 1), 1), x)


def test_hand_worked_width_below_8():
    # Frame 0 raster; frame 1: no main region, bottom row 8 first, then rows 0..7.
    perm = rf.build_permutation(rf.VideoLayout(frames=2, height=9, width=2))
    assert perm.indices.tolist() == list(range(18)) + [18 + 16, 18 + 17] + [18 + i for i in range(16)]


def test_hand_worked_tiles_of_an_aligned_frame():
    perm = rf.build_permutation(rf.VideoLayout(frames=1, height=16, width=16))
    first_tile = [r * 16 + c for r in range(8) for c in range(8)]
    second_tile = [r * 16 + 8 + c for r in range(8) for c in range(8)]
    assert perm.indices[:128].tolist() == first_tile + second_tile
    assert perm.indices[128] == 8 * 16  # third tile starts at row 8


def test_hand_worked_text_head_and_tail():
    head = rf.build_permutation(rf.VideoLayout(frames=2, height=8, width=8, text_len=3))
    assert head.indices.tolist() == list(range(3, 131)) + [0, 1, 2]
    tail = rf.build_permutation(rf.VideoLayout(frames=2, height=8, width=8, text_len=3, text_position="tail"))
    assert tail.indices.tolist() == list(range(131))


def test_permutation_is_cached_per_layout_and_device():
    from rainfusion_core.permutation import cached_permutation

    layout = rf.VideoLayout(frames=2, height=16, width=16)
    assert cached_permutation(layout) is cached_permutation(layout, "cpu")
    assert cached_permutation(layout) is not cached_permutation(rf.VideoLayout(frames=3, height=16, width=16))


def test_writing_into_a_handed_out_permutation_never_reaches_the_cache():
    layout = rf.VideoLayout(frames=3, height=16, width=8)
    first = rf.build_permutation(layout)
    expected = first.indices.clone(), first.inverse.clone()
    first.indices.zero_()
    first.inverse.fill_(-1)
    again = rf.build_permutation(layout)
    assert torch.equal(again.indices, expected[0]) and torch.equal(again.inverse, expected[1])
    # The library's own calls read the cache too: a sparse call still matches the reference.
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    plan = rf.plan_sparse_attention(q, k, layout, sparsity=0.5, block_size=32, backend="torch")
    plan.permutation.indices.zero_()  # a plan's permutation is its own copy as well
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.5, block_size=32, backend="torch")
    perm = rf.build_permutation(layout)
    qp, kp, vp = (perm.apply(x, 2) for x in (q, k, v))
    mask = rf.predict_block_mask(qp, kp, layout, sparsity=0.5, block_size=32)
    ref = perm.undo(rf.block_sparse_attention(qp, kp, vp, mask, backend="torch"), 2)
    torch.testing.assert_close(out, ref)


def test_layout_derived_lengths():
    layout = rf.VideoLayout(frames=21, height=30, width=52, text_len=256)
    assert (layout.frame_len, layout.video_len, layout.seq_len) == (1560, 32760, 33016)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(frames=0, height=8, width=8), "frames"),
        (dict(frames=1, height=-1, width=8), "height"),
        (dict(frames=1, height=8, width=2.5), "width"),
        (dict(frames=1, height=8, width=8, text_len=-3), "text_len"),
        (dict(frames=1, height=8, width=8, text_position="middle"), "text_position"),
    ],
)
def test_layout_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"VideoLayout.{field}"):
        rf.VideoLayout(**kwargs)


def test_build_permutation_rejects_non_layout():
    with pytest.raises(TypeError, match="layout must be"):
        rf.build_permutation((2, 8, 8))
