import pytest
import torch

import rainfusion_core as rf
from helpers import naive_attention

LAYOUTS = [
    pytest.param(rf.VideoLayout(3, 10, 12), id="unaligned"),
    pytest.param(rf.VideoLayout(2, 16, 16, text_len=20), id="aligned-text-head"),
    pytest.param(rf.VideoLayout(2, 9, 20, text_len=7, text_position="tail"), id="text-tail"),
    pytest.param(rf.VideoLayout(1, 16, 24), id="image"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa2"])
def test_sparse_attention_is_permute_predict_attend_unpermute(layout, heads):
    q = torch.randn(2, heads[0], layout.seq_len, 32, dtype=torch.float64)
    k = torch.randn(2, heads[1], layout.seq_len, 32, dtype=torch.float64)
    v = torch.randn(2, heads[1], layout.seq_len, 32, dtype=torch.float64)
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.6, block_size=32)

    idx = rf.build_permutation(layout).indices
    qp, kp, vp = q[:, :, idx], k[:, :, idx], v[:, :, idx]
    mask = rf.predict_block_mask(qp, kp, layout, sparsity=0.6, block_size=32)
    expected = torch.empty_like(out)
    expected[:, :, idx] = naive_attention(qp, kp, vp, mask.dense, 32, 32 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_bsnd_output_keeps_the_input_layout():
    layout = rf.VideoLayout(3, 10, 12)
    q, k, v = (torch.randn(2, layout.seq_len, 4, 16, dtype=torch.float64) for _ in range(3))
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.7, block_size=32, tensor_layout="BSND")
    assert out.shape == q.shape
    bnsd = rf.sparse_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, sparsity=0.7, block_size=32
    )
    torch.testing.assert_close(out, bnsd.transpose(1, 2), rtol=0, atol=0)


def test_zero_sparsity_is_dense_attention():
    layout = rf.VideoLayout(3, 10, 12, text_len=9)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, dtype=torch.float64) for _ in range(3))
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.0, block_size=64)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_dtype_runs(dtype):
    layout = rf.VideoLayout(2, 8, 16)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, dtype=dtype) for _ in range(3))
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.5, block_size=32)
    assert out.dtype == dtype and torch.isfinite(out).all()


def _qkv(layout, shape=None):
    shape = shape or (1, 2, layout.seq_len, 16)
    return torch.randn(shape), torch.randn(shape), torch.randn(shape)


LAYOUT = rf.VideoLayout(2, 8, 8)  # 128 tokens


@pytest.mark.parametrize(
    "mutate, kwargs, error, match",
    [
        (lambda q, k, v: (q[0], k, v), {}, ValueError, r"q must be a 4-D tensor in BNSD layout"),
        (lambda q, k, v: (q[:, :, :100], k, v), {}, ValueError, r"q has 100 tokens .* layout.seq_len is 128"),
        (lambda q, k, v: (q, k[..., :8], v), {}, ValueError, r"k head dim must equal q's \(16\)"),
        (lambda q, k, v: (q, k, v[..., :8]), {}, ValueError, r"v head dim must equal q's"),
        (lambda q, k, v: (q, k.double(), v), {}, TypeError, r"k.dtype must equal q.dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), {}, TypeError, r"q.dtype must be one of"),
        (lambda q, k, v: (q.repeat(1, 3, 1, 1), k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)), {}, ValueError,
         r"q heads \(6\) must be a multiple of k/v heads \(4\)"),
        (lambda q, k, v: (q, k, v), dict(sparsity=1.2), ValueError, r"sparsity must be in \[0, 1\)"),
        (lambda q, k, v: (q, k, v), dict(tensor_layout="BHSD"), ValueError, r"tensor_layout must be one of"),
        (lambda q, k, v: (q, k, v), dict(backend="no_such_backend"), rf.UnknownBackendError,
         r"unknown backend 'no_such_backend'; expected one of \[.*'torch'"),
        # a GPU machine: cuda:0 is present but not where the inputs are; without one it is absent
        (lambda q, k, v: (q, k, v), dict(backend="cuda:0"), ValueError, r"names the device cuda:0, but the inputs")
        if torch.cuda.is_available() else
        (lambda q, k, v: (q, k, v), dict(backend="cuda:0"), rf.BackendUnavailableError,
         r"device 'cuda:0' is not present on this machine: torch sees no cuda device"),
        (lambda q, k, v: (q, k, v), dict(backend="mlu:0"), rf.BackendUnavailableError,
         r"device 'mlu:0' is not present on this machine"),
    ],
)
def test_sparse_attention_errors(mutate, kwargs, error, match):
    q, k, v = mutate(*_qkv(LAYOUT))
    with pytest.raises(error, match=match):
        rf.sparse_attention(q, k, v, LAYOUT, **{"sparsity": 0.5, **kwargs})


def test_block_sparse_attention_mask_mismatch():
    q, k, v = _qkv(LAYOUT)
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool), block_size=64, q_len=100, kv_len=128)
    with pytest.raises(ValueError, match=r"block_mask lengths \(q_len=100, kv_len=128\) must match"):
        rf.block_sparse_attention(q, k, v, mask)
    mask = rf.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=64, q_len=128, kv_len=128)
    with pytest.raises(ValueError, match=r"block_mask batch and heads \(1, 1\) must equal"):
        rf.block_sparse_attention(q, k, v, mask)
    with pytest.raises(TypeError, match="block_mask must be a rainfusion_core.BlockMask"):
        rf.block_sparse_attention(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool))
