"""Each row's log-sum-exp beside the output, and the exact merge of partial results it allows.

``return_lse=True`` on every backend that declares ``returns_lse`` (torch, cpu, triton under
the interpreter, npu through its test double), against the float64 reference on named cases
(ragged lengths, GQA, rows that keep nothing, text); the conformance kit judges it in every
parity case (``tests/test_parity.py``); merging the results of disjoint key sets gives the
single call's result.
"""
import importlib.util

import pytest
import torch

import rainfusion_core as rf
from helpers import install_npu_double, random_dense, triton_device
from rainfusion_core.backend import Backend
from rainfusion_core.backends.torch_backend import masked_attention
from rainfusion_core.merge import merge_attention
from rainfusion_core.testing import Case, check_backend

# (name, q_len, kv_len, q_heads, kv_heads, head_dim, block)
CASES = [("ragged-113x203", 113, 203, 2, 2, 64, 64), ("gqa-300", 300, 300, 4, 2, 64, 128),
         ("1023x1024", 1023, 1024, 2, 1, 64, 128)]


def _problem(name, q_len, kv_len, q_heads, kv_heads, dim, block, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_heads, q_len, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, kv_len, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    nq, nk = -(-q_len // block), -(-kv_len // block)
    torch.manual_seed(seed)
    dense = random_dense(1, q_heads, nq, nk, density=0.5, empty_rows=[(0, h, 0) for h in range(q_heads)])
    mask = rf.BlockMask.from_dense(dense, block_size=block, q_len=q_len, kv_len=kv_len)
    low = [x.to(device, dtype) for x in (q, k, v)]
    return low, mask


def _golden(low, mask):
    return rf.block_sparse_attention(*(x.cpu().double() for x in low), mask, backend="torch", return_lse=True)


def _targets():
    found = [("torch", "cpu"), ("cpu", "cpu")]
    if importlib.util.find_spec("triton") is not None:
        found.append(("triton", None))
    return found


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("name, device", _targets(), ids=lambda x: str(x))
def test_lse_matches_the_float64_reference(name, device, case):
    if name == "triton":
        device = triton_device(module_level=False)
    backend = rf.registry.get_backend(name=name)
    low, mask = _problem(*case, torch.float32, device)
    out, lse = rf.block_sparse_attention(*low, mask.to(device), backend=backend, return_lse=True)
    golden_out, golden_lse = _golden(low, mask)
    assert lse.shape == out.shape[:3] and lse.dtype == torch.float32
    empty = golden_lse == float("-inf")
    assert empty.any() and torch.equal(lse.cpu() == float("-inf"), empty)  # rows that keep nothing: -inf, zero out
    assert out[empty.to(out.device)].abs().max() == 0
    torch.testing.assert_close(lse.cpu().double()[~empty], golden_lse[~empty], rtol=1e-6, atol=2e-5)


def test_the_npu_backend_returns_the_operators_lse(monkeypatch):
    install_npu_double(monkeypatch)
    backend = rf.registry.get_backend(name="npu")
    low, mask = _problem("gqa-300", 300, 300, 4, 2, 64, 128, torch.float16)
    out, lse = rf.block_sparse_attention(*low, mask, backend=backend, return_lse=True)
    golden_out, golden_lse = _golden(low, mask)
    empty = golden_lse == float("-inf")
    assert torch.equal(lse == float("-inf"), empty)
    torch.testing.assert_close(lse.double()[~empty], golden_lse[~empty], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tensor_layout", ["BNSD", "BSND"])
def test_sparse_attention_gives_lse_in_model_order(tensor_layout):
    layout = rf.VideoLayout(3, 8, 10, text_len=24, text_position="tail")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, generator=gen) for _ in range(3))
    plan = rf.plan_sparse_attention(q, k, layout, sparsity=0.7)
    golden_out, golden_lse = rf.block_sparse_attention(*(plan.permutation.apply(x.double(), 2) for x in (q, k, v)),
                                                       plan.block_mask, backend="torch", return_lse=True)
    args = [x.transpose(1, 2) for x in (q, k, v)] if tensor_layout == "BSND" else [q, k, v]
    for backend in ("cpu", "torch"):
        out, lse = rf.sparse_attention(*args, layout, sparsity=0.7, tensor_layout=tensor_layout,
                                       backend=rf.registry.get_backend(name=backend), return_lse=True)
        assert lse.shape == (1, 2, layout.seq_len)
        torch.testing.assert_close(lse.double(), plan.permutation.undo(golden_lse, 2), rtol=1e-6, atol=2e-5)
        bnsd = out.transpose(1, 2) if tensor_layout == "BSND" else out
        torch.testing.assert_close(bnsd.double(), plan.permutation.undo(golden_out, 2), rtol=1e-4, atol=1e-5)


def test_a_call_asking_for_lse_never_runs_dense_and_compiles_whole():
    layout = rf.VideoLayout(2, 8, 8)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32) for _ in range(3))
    dense_by_default = rf.sparse_attention(q, k, v, layout, min_tokens=10 ** 6)  # below this crossover: dense
    out, lse = rf.sparse_attention(q, k, v, layout, min_tokens=10 ** 6, return_lse=True, backend="cpu")
    assert not torch.allclose(out, dense_by_default) and torch.isfinite(lse).all()

    def call(q, k, v):
        return rf.sparse_attention(q, k, v, layout, backend="torch", return_lse=True)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, k, v), call(q, k, v)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


def test_merging_disjoint_key_sets_gives_the_whole_call():
    low, mask = _problem("gqa-300", 300, 300, 4, 2, 64, 128, torch.float32)
    whole = rf.block_sparse_attention(*low, mask, backend="cpu", return_lse=True)
    owner = torch.randint(0, 3, mask.dense.shape, generator=torch.Generator().manual_seed(0))  # one part per tile
    parts = []
    for part in range(3):
        dense = mask.dense & (owner == part)
        piece = rf.BlockMask.from_dense(dense, block_size=128, q_len=300, kv_len=300)
        parts.append(rf.block_sparse_attention(*low, piece, backend="cpu", return_lse=True))
    out, lse = merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, whole[1], rtol=1e-6, atol=1e-5)  # -inf rows included
    bsnd, _ = merge_attention([p[0].transpose(1, 2) for p in parts], [p[1] for p in parts], tensor_layout="BSND")
    torch.testing.assert_close(bsnd.transpose(1, 2), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lses\[1\] has shape \(1, 4, 299\); expected a float tensor"):
        merge_attention([p[0] for p in parts[:2]], [parts[0][1], parts[1][1][..., :299]])


class _NoLse(Backend):
    name = "no_lse"
    device_types = ("cpu",)
    priority = 99

    def forward(self, q, k, v, block_mask, scale):
        return masked_attention(q, k, v, block_mask, scale)


class _WrongLse(_NoLse):
    name = "wrong_lse"
    priority = -5
    returns_lse = True

    def forward(self, q, k, v, block_mask, scale, return_lse=False):
        out, lse = rf.registry.get_backend(name="torch").forward(q, k, v, block_mask, scale, return_lse=True)
        return (out, lse + 1e-3) if return_lse else out


def test_a_backend_without_lse_is_refused_by_name_and_skipped_automatically():
    low, mask = _problem("gqa-300", 300, 300, 4, 2, 64, 128, torch.float32)
    with rf.scoped_backends(_NoLse()):
        with pytest.raises(rf.UnsupportedInputError, match="'no_lse' cannot run this call: it does not return the "
                                                           "log-sum-exp"):
            rf.block_sparse_attention(*low, mask, backend="no_lse", return_lse=True)
        with pytest.warns(RuntimeWarning, match="'no_lse' skipped on cpu"):
            rf.block_sparse_attention(*low, mask, return_lse=True)
        assert rf.block_sparse_attention(*low, mask).shape == low[0].shape  # without lse it is chosen
    with pytest.raises(ValueError, match="return_lse must be"):
        rf.block_sparse_attention(*low, mask, return_lse="yes")


def test_the_conformance_kit_catches_a_wrong_lse():
    report = check_backend(_WrongLse(), dtypes=[torch.float32], cases=[Case("len-300", 300, 300)])
    assert not report.passed and "lse max error" in report.rows[0].detail, report.table()
    assert check_backend("cpu", dtypes=[torch.float32], cases=[Case("len-300", 300, 300)]).passed


def test_lse_buffers_and_arguments_are_checked_at_the_boundary():
    from rainfusion_core import _cpu_kernel as kernel
    from rainfusion_core.backends.triton.launch import block_sparse_attention_triton, interpreting

    low, mask = _problem("gqa-300", 300, 300, 4, 2, 64, 128, torch.float32)
    q, k, v = low
    out = torch.empty_like(q)
    args = (mask.kv_counts.numpy(), mask.kv_indices.numpy(), 128, 0.125, 1)
    with pytest.raises(ValueError, match=r"lse must be a writeable array of shape \[B, Hq, Sq\]"):
        kernel.forward(q.numpy(), k.numpy(), v.numpy(), out.numpy(), *args, lse=torch.empty(300, 4, 1).numpy())
    with pytest.raises(ValueError, match="lse must not overlap q, k, v or out"):
        kernel.forward(q.numpy(), k.numpy(), v.numpy(), out.numpy(), *args,
                       lse=out.view(-1)[:4 * 300].view(1, 4, 300).numpy())
    if importlib.util.find_spec("triton") is not None and interpreting():
        for bad in (torch.empty(1, 4, 10), torch.empty(1, 300, 4).transpose(1, 2), torch.empty(1, 4, 300).half()):
            with pytest.raises(ValueError, match=r"lse must be a float32 tensor of shape \(1, 4, 300\)"):
                block_sparse_attention_triton(q, k, v, mask, 0.125, lse=bad)
    layout = rf.VideoLayout(2, 8, 8)
    x = torch.randn(1, 2, layout.seq_len, 32)
    with pytest.raises(ValueError, match="return_lse must be"):
        rf.sparse_attention(x, x, x, layout, backend="torch", return_lse="False")


def test_lse_is_refused_in_fp8_at_selection():
    from helpers import Fp8Emulation

    class Fp8WithLse(Fp8Emulation):
        name = "fp8_with_lse"
        returns_lse = True

    low, mask = _problem("gqa-300", 300, 300, 4, 2, 64, 128, torch.bfloat16)
    with rf.scoped_backends(Fp8WithLse()):
        with pytest.raises(rf.UnsupportedInputError, match="the log-sum-exp comes only from the bf16 kernels, not "
                                                           "in precision 'fp8'"):
            rf.block_sparse_attention(*low, mask, backend="fp8_with_lse", precision="fp8", return_lse=True)


def test_a_nan_lse_poisons_its_merged_row():
    out = torch.ones(1, 1, 3, 2)
    lse = torch.tensor([[[0.0, float("nan"), float("-inf")]]])
    merged, total = merge_attention([out, out], [lse, torch.full_like(lse, float("-inf"))])
    assert merged[0, 0, 0].eq(1).all() and merged[0, 0, 1].isnan().all() and merged[0, 0, 2].eq(0).all()
    assert total[0, 0, 1].isnan() and total[0, 0, 2] == float("-inf")


def test_an_unregistered_backend_object_is_checked_like_a_registered_one():
    backend = _NoLse()
    backend.head_dims = 64  # not a tuple
    low, mask = _problem("gqa-300", 300, 300, 4, 2, 64, 128, torch.float32)
    with pytest.raises(ValueError, match="backend 'no_lse': head_dims must be None, a non-empty tuple"):
        rf.block_sparse_attention(*low, mask, backend=backend)
