"""The C++ ``cpu`` backend: exactness in float64, agreement with SDPA, selection (parity: test_parity.py).

The extension must be built (the README's setup builds it); set
RAINFUSION_SKIP_CPP=1 only on a machine deliberately installed without it.
"""
import os

import pytest
import torch

import rainfusion_core as rf
from rainfusion_core.backends import cpu as cpu_module
from rainfusion_core.testing import Case, run_case

if os.environ.get("RAINFUSION_SKIP_CPP") == "1":
    pytest.skip("RAINFUSION_SKIP_CPP=1: installed without the C++ extension", allow_module_level=True)

def test_float64_is_exact_to_rounding():
    result = run_case(rf.get_backend(name="cpu"), Case("1023-gqa2", 1023, 1023, 2, 1, 64), torch.float64, "cpu")
    assert result.max_error < 1e-12


def test_full_mask_matches_sdpa():
    q, k, v = (torch.randn(1, 4, 1000, 64) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 4, 8, 8, dtype=torch.bool), block_size=128, q_len=1000, kv_len=1000)
    out = rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend(name="cpu"))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-4)


def test_sparse_attention_uses_the_cpu_backend_by_default():
    assert rf.get_backend("cpu").name == "cpu"
    layout = rf.VideoLayout(3, 10, 12)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, dtype=torch.float64) for _ in range(3))
    fast = rf.sparse_attention(q, k, v, layout, sparsity=0.6, block_size=32)
    ref = rf.sparse_attention(q, k, v, layout, sparsity=0.6, block_size=32, backend="torch")
    assert (fast - ref).abs().max() < 1e-12


def test_missing_extension_falls_back_with_warning_and_explicit_use_fails(monkeypatch):
    monkeypatch.setattr(cpu_module, "_load_kernel", lambda: (None, "the C++ extension is not built (test)"))
    with rf.scoped_backends():  # its own once-only warnings
        _check_missing_extension()


def _check_missing_extension():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=64, q_len=64, kv_len=64)
    with pytest.warns(RuntimeWarning, match=r"'cpu' skipped on cpu \(the C\+\+ extension is not built \(test\)\); using 'torch'"):
        rf.block_sparse_attention(q, k, v, mask)
    with pytest.raises(rf.BackendUnavailableError, match="'cpu' is unavailable: the C\\+\\+ extension is not built"):
        rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend(name="cpu"))
    rows = {r.name: r for r in rf.list_backends()}
    assert not rows["cpu"].available and "not built" in rows["cpu"].reason


def test_kernel_reports_openmp():
    kernel, reason = cpu_module._load_kernel()
    assert reason is None
    assert isinstance(kernel.has_openmp(), bool)


def _isas():
    if os.environ.get("RAINFUSION_SKIP_CPP") == "1":
        return []
    kernel, _ = cpu_module._load_kernel()
    return kernel.available_isas().split(", ") if kernel is not None else []


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_instruction_set_path_this_cpu_runs_meets_the_parity_rule(isa, monkeypatch):
    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} path (it runs: {', '.join(_isas())})")
    from rainfusion_core.testing import check_backend, default_cases

    monkeypatch.setenv("RAINFUSION_CPU_ISA", isa)
    assert cpu_module.kernel_description().startswith({"avx512": "AVX-512F", "avx2": "AVX2", "generic": "generic"}[isa])
    report = check_backend("cpu", dtypes=[torch.float32, torch.bfloat16, torch.float64],
                           cases=default_cases((40, 64, 128), long=False))
    assert report.passed, report.table()


def test_the_portable_path_always_exists_and_an_unknown_path_is_refused(monkeypatch):
    assert "generic" in _isas()
    q = torch.randn(1, 1, 128, 16)
    mask = rf.BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=128, q_len=128, kv_len=128)
    monkeypatch.setenv("RAINFUSION_CPU_ISA", "neon512")
    expected = "RAINFUSION_CPU_ISA='neon512': unknown instruction set 'neon512'; expected one of: .*generic"
    with pytest.raises(ValueError, match=expected):
        rf.block_sparse_attention(q, q, q, mask, backend=rf.get_backend(name="cpu"))
    assert "RAINFUSION_CPU_ISA" in cpu_module.kernel_description()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 2e-6], ids=["normal", "small", "subnormal-in-fp16"])
def test_16bit_inputs_are_converted_exactly_and_the_output_rounded_to_nearest(dtype, magnitude):
    """The kernel reads float16 / bfloat16 bits and converts tile by tile: the result must be the float32
    computation on the same values, rounded once to the input dtype (as torch rounds, to nearest even),
    bit for bit, also where the values are subnormal in float16. Strided (BSND) views too."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 300, 3, 64).to(dtype).transpose(1, 2) for _ in range(2))
    v = (torch.randn(1, 300, 3, 64) * magnitude).to(dtype).transpose(1, 2)
    mask = rf.predict_block_mask(q.float(), k.float(), rf.VideoLayout(3, 10, 10), sparsity=0.5, block_size=64)
    cpu = rf.get_backend(name="cpu")
    got = rf.block_sparse_attention(q, k, v, mask, backend=cpu)
    expected = rf.block_sparse_attention(q.float(), k.float(), v.float(), mask, backend=cpu).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
