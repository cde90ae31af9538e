"""The ``npu`` backend against a strict double of torch_npu.npu_block_sparse_attention.

No Ascend device exists here: the double (tests/npu_double.py) stands in for
``torch_npu`` in ``sys.modules`` for each test only (fixture-isolated; it
patches nothing global), and CPU tensors stand in for NPU tensors.
"""
import sys

import pytest
import torch

import npu_double
import rainfusion_core as rf
from helpers import install_npu_double
from rainfusion_core.backends.npu import NpuBackend
from rainfusion_core.testing import Case, check_backend


@pytest.fixture
def torch_npu(monkeypatch):
    return install_npu_double(monkeypatch)


def test_unavailable_without_torch_npu_and_not_imported_eagerly():
    if "torch_npu" in sys.modules:
        pytest.skip("a real torch_npu is imported in this process")
    reason = NpuBackend().unavailable_reason()
    assert reason.startswith("torch_npu is not installed")
    assert "torch_npu" not in sys.modules
    rows = {r.name: r for r in rf.list_backends()}
    assert not rows["npu"].available and "torch_npu is not installed" in rows["npu"].reason


def test_no_device_visible(torch_npu, monkeypatch):
    monkeypatch.setattr(torch_npu.npu, "is_available", lambda: False)
    assert NpuBackend().unavailable_reason() == "torch_npu is installed but no Ascend NPU device is visible"


def test_selected_for_npu_device_strings(torch_npu):
    assert rf.get_backend("npu:0").name == "npu"
    assert rf.get_backend("npu").name == "npu"


def test_float32_and_other_head_dims_are_refused_with_the_reason(torch_npu):
    report = check_backend("npu", device="cpu", dtypes=[torch.float32, torch.float16],
                           cases=[Case("len-300-d64", 300, 300, head_dim=64), Case("len-300-d32", 300, 300, head_dim=32)])
    verdicts = {(r.case, r.dtype): r.verdict for r in report.rows}
    assert verdicts == {("len-300-d64", "float32"): "refused", ("len-300-d64", "float16"): "pass",
                        ("len-300-d32", "float32"): "refused", ("len-300-d32", "float16"): "refused"}, report.table()


def test_arguments_follow_the_operator_contract(torch_npu):
    q, k, v = (torch.randn(1, h, 300, 64, dtype=torch.bfloat16) for h in (4, 2, 2))
    mask = rf.BlockMask.from_dense(torch.ones(1, 4, 3, 3, dtype=torch.bool), block_size=128, q_len=300, kv_len=300)
    rf.block_sparse_attention(q, k, v, mask, scale=0.2, backend=rf.get_backend(name="npu"))
    (call,) = npu_double.CALLS
    assert call["q_input_layout"] == call["kv_input_layout"] == "BNSD"
    assert call["num_key_value_heads"] == 2 and call["inner_precise"] == 0
    assert call["scale_value"] == pytest.approx(0.2) and call["block_shape"] == [128, 128]
    assert call["actual_seq_lengths"] is None and call["actual_seq_lengths_kv"] is None


def test_empty_rows_are_zero_even_though_the_operator_leaves_nan(torch_npu):
    q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.float16) for _ in range(3))
    dense = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    dense[0, 1, 0] = False
    mask = rf.BlockMask.from_dense(dense, block_size=128, q_len=256, kv_len=256)
    raw, _ = torch_npu.npu_block_sparse_attention(
        q, k, v, dense.to(torch.int8), [128, 128], q_input_layout="BNSD", kv_input_layout="BNSD",
        num_key_value_heads=2, scale_value=0.125, inner_precise=0)
    assert raw[0, 1, :128].isnan().all()  # the double's worst case
    out = rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend(name="npu"))
    assert out[0, 1, :128].abs().max() == 0 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "dtype, dim, block_size, match",
    [
        (torch.float32, 64, 128, "dtype torch.float32 is not supported \\(float16, bfloat16 are\\)"),
        (torch.float16, 96, 128, "head dim 96 is not supported \\(64, 128 are\\)"),
        (torch.float16, 64, 64, "mask block size 64 is not a multiple of 128"),
    ],
)
def test_refusals_are_sentences(torch_npu, dtype, dim, block_size, match):
    q = torch.randn(1, 2, 256, dim, dtype=dtype)
    nb = -(-256 // block_size)
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, nb, nb, dtype=torch.bool), block_size=block_size, q_len=256, kv_len=256)
    with pytest.raises(rf.UnsupportedInputError, match=match):
        rf.block_sparse_attention(q, q, q, mask, backend=rf.get_backend(name="npu"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inner_precise=1), "bfloat16 requires inner_precise=0"),
        (dict(q_input_layout="BSND", kv_input_layout="BSND"), "unknown q_input_layout"),
        (dict(kv_input_layout="TND"), "must be equal"),
        (dict(actual_seq_lengths=[256]), "set both"),
        (dict(block_shape=[128, 64]), "multiple of 128"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_the_double_is_strict(torch_npu, kwargs, match):
    q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3))
    args = dict(q_input_layout="BNSD", kv_input_layout="BNSD", num_key_value_heads=2, scale_value=0.125,
                inner_precise=0)
    block_shape = kwargs.pop("block_shape", [128, 128])
    args.update(kwargs)
    mask = torch.ones(1, 2, 2, 256 // block_shape[1], dtype=torch.int8)
    with pytest.raises(RuntimeError, match=match):
        torch_npu.npu_block_sparse_attention(q, k, v, mask, block_shape, **args)


def test_frontend_runs_with_plain_ops_end_to_end(torch_npu):
    layout = rf.VideoLayout(4, 16, 16)  # 1024 tokens
    q, k, v = (torch.randn(1, 2, layout.seq_len, 64, dtype=torch.float64) for _ in range(3))
    low = [x.to(torch.bfloat16) for x in (q, k, v)]
    out = rf.sparse_attention(*low, layout, sparsity=0.5, backend=rf.get_backend(name="npu"))
    ref = rf.sparse_attention(*low, layout, sparsity=0.5, backend="torch")
    assert (out.float() - ref.float()).abs().max() < 3e-2
