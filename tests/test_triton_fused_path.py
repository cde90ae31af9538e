"""The Triton backend's fused path: mask prediction kernels and attention read through the permutation.

Both must give what the eager definitions give: the same mask (bit for bit
on inputs without near-ties) and the same attention as permuted copies. On a
machine without a GPU they run in Triton's CPU interpreter.
"""
import pytest
import torch

import rainfusion_core as rf
from helpers import triton_device
from rainfusion_core.ops import predict_block_mask_op
from rainfusion_core.prediction import predict_mask
from rainfusion_core.selection import select_blocks

DEVICE = triton_device()

LAYOUTS = {
    "aligned-sink": (rf.VideoLayout(3, 8, 16), 32, 0.5),
    "unaligned-partial-last-block": (rf.VideoLayout(3, 10, 12), 32, 0.7),
    "text-head": (rf.VideoLayout(4, 8, 8, text_len=20), 16, 0.8),
    "text-tail": (rf.VideoLayout(2, 9, 9, text_len=5, text_position="tail"), 16, 0.6),
    "image-block64": (rf.VideoLayout(1, 16, 24), 64, 0.9),
}
HEADS = {"mha": (2, 2), "gqa4": (4, 1)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Every layout with both head counts; the input dtype (only how the block means read q and k) rotates over them,
# so each dtype meets several layouts and both head counts without the whole product (each case is interpreted)
PREDICTION_CASES = [
    pytest.param(*LAYOUTS[name], HEADS[heads], DTYPES[dtype], id=f"{dtype}-{heads}-{name}")
    for i, name in enumerate(LAYOUTS) for j, heads in enumerate(HEADS)
    for dtype in [list(DTYPES)[(i + j) % len(DTYPES)]]
]


def _assert_same_mask(got: rf.BlockMask, want: rf.BlockMask):
    assert torch.equal(got.dense, want.dense)
    assert torch.equal(got.kv_counts, want.kv_counts)
    assert torch.equal(got.kv_indices, want.kv_indices)  # kept blocks, then the skipped ones, ascending


@pytest.mark.parametrize("layout, block_size, sparsity, heads, dtype", PREDICTION_CASES)
def test_fused_prediction_equals_reference(layout, block_size, sparsity, heads, dtype):
    q = torch.randn(2, heads[0], layout.seq_len, 32, device=DEVICE, dtype=dtype)
    k = torch.randn(2, heads[1], layout.seq_len, 32, device=DEVICE, dtype=dtype)
    kwargs = dict(sparsity=sparsity, block_size=block_size)
    _assert_same_mask(rf.predict_block_mask(q, k, layout, backend="triton", **kwargs),
                      rf.predict_block_mask(q, k, layout, backend="torch", **kwargs))


def test_fused_prediction_reads_model_order_through_the_permutation():
    layout = rf.VideoLayout(3, 10, 12, text_len=9)
    q, k = (torch.randn(1, 2, layout.seq_len, 48, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
            for _ in range(2))  # BSND memory viewed as BNSD
    perm = rf.build_permutation(layout, DEVICE)
    kwargs = dict(sparsity=0.7, block_size=32, first_frame_sink=None, scale=None, share_batch_mask=False)
    fused = predict_mask(q, k, layout, perm.indices, backend="triton", **kwargs)
    reference = predict_mask(perm.apply(q, 2), perm.apply(k, 2), layout, None, backend="torch", **kwargs)
    _assert_same_mask(fused, reference)


def test_fused_prediction_shared_batch_mask():
    layout = rf.VideoLayout(2, 8, 16)
    q, k = (torch.randn(3, 2, layout.seq_len, 16, device=DEVICE) for _ in range(2))
    mask = rf.predict_block_mask(q, k, layout, sparsity=0.8, block_size=32, share_batch_mask=True, backend="triton")
    assert mask.shape[0] == 3 and torch.equal(mask.dense[1], mask.dense[0])
    _assert_same_mask(mask, rf.predict_block_mask(q, k, layout, sparsity=0.8, block_size=32,
                                                  share_batch_mask=True, backend="torch"))


@pytest.mark.parametrize(
    "row, keep, sink, text",
    [
        pytest.param([3.0, 1.0, 3.0, 2.0, 3.0, 0.0, 1.0], 2, 0, 0, id="ties-with-kth-kept"),
        pytest.param([0.0, -500.0, -600.0, -700.0, 5.0, -800.0], 3, 0, 0, id="underflow-kth-is-zero"),
        pytest.param([0.5, 2.0, -1.0, 4.0, 0.0, 1.5, 3.0, -2.0], 2, 2, 1, id="sink-and-text"),
        pytest.param(None, 9, 1, 0, id="random-90-cols"),
        pytest.param(None, 1, 0, 2, id="keep-one-of-600-cols"),
    ],
)
def test_fused_selection_equals_reference(row, keep, sink, text):
    # [1, 1, NQ, N] score matrices, each row a shuffle of ``row``: square (as in a self-attention mask) up to
    # 90 columns; 4 rows of the 600 (a second each, interpreted), 2 of them forced text rows.
    row = torch.tensor(row) if row is not None else torch.randn(90 if keep == 9 else 600)
    n = row.numel()
    n_rows = n if n <= 90 else 4
    scores = torch.stack([row[torch.randperm(n)] for _ in range(n_rows)]).reshape(1, 1, n_rows, n).to(DEVICE)
    kwargs = dict(scale=1.0, keep=keep, sink_blocks=sink, text_blocks=text)
    got = rf.get_backend("triton").mask_predictor(scores.dtype).select_blocks(scores, **kwargs)
    for g, w in zip(got, select_blocks(scores, **kwargs)):
        assert torch.equal(g, w)


def test_prediction_op_passes_opcheck():
    layout = rf.VideoLayout(2, 8, 16)
    q, k = torch.randn(1, 4, layout.seq_len, 16, device=DEVICE), torch.randn(1, 2, layout.seq_len, 16, device=DEVICE)
    order = rf.build_permutation(layout, DEVICE).indices
    for backend in ("torch", "triton"):
        args = (q, k, order, 32, 0.25, 3, 2, 0, backend)
        torch.library.opcheck(predict_block_mask_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("tensor_layout", ["BNSD", "BSND"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa2"])
def test_attention_through_the_permutation_equals_permuted_copies(tensor_layout, heads):
    layout = rf.VideoLayout(3, 10, 12, text_len=7)  # unaligned grid, ragged last block
    shape = lambda h: (1, h, layout.seq_len, 32) if tensor_layout == "BNSD" else (1, layout.seq_len, h, 32)  # noqa
    q = torch.randn(shape(heads[0]), device=DEVICE)
    k, v = (torch.randn(shape(heads[1]), device=DEVICE) for _ in range(2))
    kwargs = dict(sparsity=0.6, block_size=32, tensor_layout=tensor_layout)
    out = rf.sparse_attention(q, k, v, layout, backend="triton", **kwargs)
    golden = rf.sparse_attention(q.double(), k.double(), v.double(), layout, backend="torch", **kwargs)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.double(), golden, rtol=0, atol=2e-5)


def test_gathered_kv_and_permuted_kv_copies_agree():
    from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton

    layout = rf.VideoLayout(2, 9, 20)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, device=DEVICE) for _ in range(3))
    perm = rf.build_permutation(layout, DEVICE)
    mask = rf.predict_block_mask(perm.apply(q, 2), perm.apply(k, 2), layout, sparsity=0.5, block_size=32)
    gathered = block_sparse_attention_triton(q, k, v, mask, 0.2, order=perm.indices)
    copied = block_sparse_attention_triton(q, k, v, mask, 0.2, order=perm.indices, options=TritonOptions(gather_kv=False))
    assert torch.equal(gathered, copied)
    permuted = block_sparse_attention_triton(*(perm.apply(x, 2) for x in (q, k, v)), mask, 0.2)
    assert torch.equal(gathered, perm.undo(permuted, 2))


def test_gather_rows_equals_index_select_on_strided_views():
    from rainfusion_core.backends.triton.permute import gather_rows

    layout = rf.VideoLayout(2, 9, 20, text_len=3)
    x = torch.randn(2, layout.seq_len, 3, 40, device=DEVICE).transpose(1, 2)  # BSND memory, D not a power of 2
    order = rf.build_permutation(layout, DEVICE).indices
    (got,) = gather_rows(order, x)
    assert got.is_contiguous() and torch.equal(got, x.index_select(2, order))


def test_gather_rows_into_writes_its_output_and_checks_it():
    from rainfusion_core.backends.triton.permute import gather_rows_into

    layout = rf.VideoLayout(2, 5, 7)  # 70 tokens
    x = torch.randn(2, 3, layout.seq_len, 24, device=DEVICE)
    order = rf.build_permutation(layout, DEVICE).indices
    out = torch.full((2, 3, 70, 24), float("nan"), device=DEVICE)
    assert gather_rows_into(order, x, out) is out and torch.equal(out, x.index_select(2, order))
    shape = r"out: .*\[2, 3, 70, 24\], got .* \[2, 3, 69, 24\]"
    for bad, match in [(torch.empty(2, 3, 69, 24, device=DEVICE), shape),
                       (torch.empty(2, 3, 24, 70, device=DEVICE).transpose(2, 3), "not contiguous"),
                       (torch.empty(2, 3, 70, 24, device=DEVICE, dtype=torch.float16), "torch.float16")]:
        with pytest.raises(ValueError, match=match):
            gather_rows_into(order, x, bad)
    with pytest.raises(ValueError, match=r"order: expected shape \[70\], got \[69\]"):
        gather_rows_into(order[:69], x, torch.empty_like(x))
