"""``precision=``: the FP8 recipe's reference, its checks, selection by precision, the FP8 quantiser.

The FP8 kernel itself needs an NVIDIA Hopper GPU (``test_ws_kernel.py``); here the
recipe is proved on the CPU: the reference rounds what it should and no more, the
conformance kit's FP8 rule catches a backend that rounds worse, every entry point
refuses ``"fp8"`` where nothing can run it, and the Triton pass that quantises k and v
for the kernel equals the reference's rounding bit for bit (Triton interpreter).
"""
import math

import pytest
import torch

import rainfusion_core as rf
from helpers import Fp8Emulation, random_dense
from rainfusion_core import fp8
from rainfusion_core.backends.torch_backend import masked_attention
from rainfusion_core.errors import BackendError, UnsupportedInputError
from rainfusion_core.testing import Case, check_backend


def _mask(batch, heads, q_len, kv_len, density=0.4, block=128, empty_rows=()):
    nq, nk = -(-q_len // block), -(-kv_len // block)
    dense = random_dense(batch, heads, nq, nk, density=density, empty_rows=list(empty_rows))
    return rf.BlockMask.from_dense(dense, block_size=block, q_len=q_len, kv_len=kv_len)


# --------------------------------------------------------------------------- the recipe
def test_power_of_two_scales_put_the_group_maximum_in_128_to_256():
    amax = torch.tensor([1e-30, 0.0, 3.0e-3, 0.5, 1.0, 1.99, 2.0, 300.0, 6e4])
    multiplier, descale = fp8.power_of_two_scale(amax)
    assert torch.equal(multiplier * descale, torch.ones_like(amax))
    assert torch.equal(torch.log2(multiplier), torch.log2(multiplier).round())  # exact powers of two
    top = amax.clamp_min(fp8.MIN_AMAX) * multiplier
    assert ((top >= 128) & (top < 256)).all(), top


def test_quantize_rows_groups_and_round_trip():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 300, 64) * torch.logspace(-3, 2, 300)[:, None]  # groups of very different size
    x[0, 0, :64] = 0.0  # an all-zero group: scale stays finite, values stay zero
    values, descale = fp8.quantize_rows(x, 64)
    assert values.shape == x.shape and descale.shape == (2, 3, 5)
    assert torch.equal(values, fp8.round_fp8(values))  # every value is a float8 value
    assert (values[0, 0, :64] == 0).all() and torch.isfinite(descale).all()
    back = values * descale.repeat_interleave(64, dim=2)[:, :, :300, None]
    group_max = x.abs().unflatten(2, (-1, 60)).amax(dim=(3, 4), keepdim=True)  # coarse bound per 60 rows
    rel = ((back - x).abs().unflatten(2, (-1, 60)) / group_max.clamp_min(1e-30)).amax()
    assert rel <= 2.0 ** -4, rel  # 3 mantissa bits: half an ulp is 1/16 of the top binade at worst


def test_quantize_channels_scales_each_column():
    torch.manual_seed(1)
    v = torch.randn(1, 2, 200, 8) * torch.tensor([1e-4, 1e-2, 1, 10, 100, 1, 1, 1])
    values, descale = fp8.quantize_channels(v)
    assert descale.shape == (1, 2, 8)
    top = (values.abs().amax(dim=2))
    assert ((top >= 128) & (top <= 256)).all()  # every channel uses the range, whatever its size


def test_reference_error_is_the_rounding_and_no_more():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 64, dtype=torch.float64) for _ in range(3))
    mask = _mask(1, 2, 300, 300, empty_rows=[(0, 1, 1)])
    golden = masked_attention(q, k, v, mask, 0.125)
    ref = fp8.fp8_reference_attention(q, k, v, mask, 0.125)
    bf16 = masked_attention(*(x.bfloat16() for x in (q, k, v)), mask, 0.125).double()
    rel = lambda x: float((x - golden).norm() / golden.norm())  # noqa: E731
    assert rel(bf16) < rel(ref) < 0.06, (rel(bf16), rel(ref))  # it really rounds to 3 mantissa bits
    assert float(torch.nn.functional.cosine_similarity(ref.flatten(), golden.flatten(), dim=0)) > 0.998
    assert (ref[0, 1, 128:256] == 0).all()  # a row with no kept block is zero


def test_reference_with_inputs_on_the_fp8_grid_is_exact_but_for_p():
    # q, k, v already float8 values with unit scales: only the rounding of P remains.
    torch.manual_seed(3)
    q, k, v = (fp8.round_fp8(torch.randn(1, 1, 256, 32) * 100) for _ in range(3))
    mask = _mask(1, 1, 256, 256, density=1.0)
    golden = masked_attention(q.double(), k.double(), v.double(), mask, 0.01)
    ref = fp8.fp8_reference_attention(q, k, v, mask, 0.01)
    assert float((ref - golden).abs().max() / golden.abs().max()) < 2.0 ** -4


# --------------------------------------------------------------------------- checks and selection
@pytest.mark.parametrize("bad", ["int8", "FP8", None, 8])
def test_a_bad_precision_is_named(bad):
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="precision must be one of"):
        rf.sparse_attention(q, q, q, rf.VideoLayout(1, 8, 8), precision=bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        rf.block_sparse_attention(q, q, q, _mask(1, 1, 64, 64), precision=bad)


def test_fp8_where_no_backend_offers_it_is_an_error_never_a_fallback():
    q = torch.randn(1, 2, 300, 64)
    layout = rf.VideoLayout(3, 10, 10)
    with pytest.raises(BackendError, match="precision 'fp8'"):
        rf.sparse_attention(q, q, q, layout, precision="fp8")
    with pytest.raises(UnsupportedInputError, match="precision 'fp8'"):
        rf.sparse_attention(q, q, q, layout, precision="fp8", backend="torch")
    plan = rf.plan_sparse_attention(q, q, layout, precision="bf16")
    assert plan.precision == "bf16"
    with pytest.raises(BackendError, match="precision 'fp8'"):
        rf.plan_sparse_attention(q, q, layout, precision="fp8")


def test_triton_refuses_fp8_off_hopper_with_its_reason():
    pytest.importorskip("triton")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("on a Hopper GPU the FP8 kernel runs (test_ws_kernel.py)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from rainfusion_core.backends.triton.launch import interpreting

    if device == "cpu" and not interpreting():
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    q = torch.randn(1, 2, 256, 64, device=device, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedInputError, match="FP8 runs on the Hopper kernel"):
        rf.block_sparse_attention(q, q, q, _mask(1, 2, 256, 256).to(device), backend="triton", precision="fp8")


class _NoPrecisionKeyword(rf.Backend):
    """A plugin written before precisions existed: its methods take no ``precision``."""

    name = "old_plugin"
    device_types = ("cpu",)
    priority = 98

    def unsupported_reasons(self, q, k, v, block_mask):
        return []

    def forward(self, q, k, v, block_mask, scale):
        return masked_attention(q, k, v, block_mask, scale)


def test_precision_reaches_only_backends_that_list_it():
    q = torch.randn(1, 2, 300, 64)
    layout = rf.VideoLayout(3, 10, 10)
    with rf.scoped_backends(Fp8Emulation(), _NoPrecisionKeyword()) as (emulation, _):
        dense = rf.sparse_attention(q, q, q, layout, sparsity=0.5)
        assert ("forward", "bf16") in emulation.seen  # the default never arrives as a keyword...
        emulation.seen.clear()
        out = rf.sparse_attention(q, q, q, layout, sparsity=0.5, precision="fp8")
        assert ("forward", "fp8") in emulation.seen  # ...fp8 does
        assert not torch.equal(out, dense)
        assert float(torch.nn.functional.cosine_similarity(out.flatten(), dense.flatten(), dim=0)) > 0.99
        emulation.precisions = ("bf16",)
        out = rf.sparse_attention(q, q, q, layout, sparsity=0.5, backend="old_plugin")  # never sees precision
        with pytest.raises(BackendError, match="fp8_emulation: it does not compute in precision 'fp8'"):
            rf.sparse_attention(q, q, q, layout, precision="fp8")


@pytest.mark.parametrize("precisions", [("fp8",), ("bf16", "int4"), ["bf16"]])
def test_a_backend_declaring_bad_precisions_is_refused(precisions):
    backend = _NoPrecisionKeyword()
    backend.precisions = precisions
    with pytest.raises(ValueError, match="precisions must be a tuple"):
        rf.register_backend(backend)


# --------------------------------------------------------------------------- the conformance kit in FP8
CASES = [Case("len-113", 113, 113), Case("cross-113x203", 113, 203), Case("gqa-2to1", 257, 257, 4, 2),
         Case("bsnd-strides", 300, 300, 4, 2, bsnd=True), Case("empty-rows", 640, 640, pattern="empty_rows")]


def test_the_fp8_kit_passes_the_recipe():
    with rf.scoped_backends(Fp8Emulation()) as (backend,):
        report = check_backend(backend, device="cpu", dtypes=[torch.bfloat16, torch.float64], cases=CASES,
                               precision="fp8")
    assert report.passed, report.table()
    assert {r.verdict for r in report.rows if r.dtype == "float64"} == {"refused"}


def test_the_fp8_kit_fails_a_backend_that_rounds_worse():
    with rf.scoped_backends(Fp8Emulation(p_dtype=torch.float8_e5m2)) as (backend,):
        report = check_backend(backend, device="cpu", dtypes=[torch.bfloat16], cases=CASES, precision="fp8")
    assert not report.passed, report.table()


# --------------------------------------------------------------------------- the Triton quantiser
@pytest.mark.parametrize("bsnd", [False, True], ids=["bnsd", "bsnd"])
@pytest.mark.parametrize("length,head_dim", [(300, 64), (129, 128)])
def test_triton_quantiser_equals_the_reference_rounding(length, head_dim, bsnd):
    from helpers import triton_device

    device = triton_device(module_level=False)
    from rainfusion_core.backends.triton.quantize import key_slots, padded_length, quantize_kv

    torch.manual_seed(4)
    shape = (2, length, 2, head_dim) if bsnd else (2, 2, length, head_dim)
    k, v = (torch.randn(shape, dtype=torch.bfloat16) for _ in range(2))
    if bsnd:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    k[0, 1, :128] *= 1e-6  # tiny values: float8 subnormals after scaling against a larger block
    k[0, 1, 0] = 3.0
    v[0, 1, :, 5] *= 1e-6  # float8 subnormals in v too
    v[0, 1, 0, 5] = 1.0
    k[1, 0, 128:] = 0.0  # an all-zero block
    v[..., :3] *= 1e-3
    order = torch.randperm(length)
    k8, k_descale, v8t, v_descale = quantize_kv(k.to(device), v.to(device), order.to(device), 128)
    want_k, want_kd = fp8.quantize_rows(k[:, :, order], 128)
    want_v, want_vd = fp8.quantize_channels(v[:, :, order])
    assert v8t.shape == (2, 2, head_dim, -(-length // 32) * 32)
    assert torch.equal(k8.cpu().float(), want_k) and torch.equal(k_descale.cpu(), want_kd)
    slots = key_slots(length)
    assert torch.equal(v8t[..., slots].cpu().float().transpose(2, 3), want_v)
    padding = torch.ones(padded_length(length), dtype=torch.bool)
    padding[slots] = False  # the columns of keys past the end: zeros, read by the kernel's last tile
    assert bool((v8t[..., padding].cpu().float() == 0).all())
    assert torch.equal(v_descale.cpu(), want_vd)
    assert math.isfinite(float(k_descale.max()))


def test_cli_fp8_where_it_cannot_run_is_one_line_and_status_2(capsys):
    from rainfusion_core.cli import main

    assert main(["bench", "--device", "cpu", "--shape", "1,1,2,8,8,16", "--sparsity", "0.5", "--repeats", "1",
                 "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "precision 'fp8'" in err
    # the torch backend refuses every FP8 case, with its reason; nothing proved is a failed check
    assert main(["parity", "--backend", "torch", "--dtypes", "bfloat16", "--quick", "--precision", "fp8"]) == 1
    assert "does not compute in precision 'fp8'" in capsys.readouterr().out


@pytest.mark.parametrize("length", [32, 113, 256], ids=lambda n: f"S{n}")
def test_v8t_key_order_is_the_fp8_kernels_register_order(length):
    """P V is unchanged when P's columns are taken as the FP8 kernel's _p_operand takes them (a reshape into
    key bits and the kernel's own permutation, P_KEY_DIMS) and v's keys as quantize.key_slots stores them."""
    pytest.importorskip("triton")
    from rainfusion_core.backends.triton.hopper.attention import P_KEY_DIMS
    from rainfusion_core.backends.triton.quantize import key_slots, padded_length

    width = padded_length(length)
    slots = key_slots(length)
    assert sorted(slots.tolist()) == sorted(set(slots.tolist())) and int(slots.max()) < width
    assert torch.equal(slots // 32, torch.arange(length) // 32)  # keys never leave their 32-key chunk
    torch.manual_seed(0)
    p = torch.rand(64, width, dtype=torch.float64)
    p[:, length:] = 0.0  # keys past the end: probability 0 (masked to -inf in the kernel)
    v = torch.randn(length, 16, dtype=torch.float64)
    stored = torch.zeros(width, 16, dtype=torch.float64)
    stored[slots] = v  # v8t's columns, as rows here
    kernel_p = p.reshape(64, width // 32, 2, 2, 2, 2, 2).permute(*P_KEY_DIMS).reshape(64, width)
    assert torch.allclose(kernel_p @ stored, p[:, :length] @ v)


def test_fp8_operands_of_the_wrong_shape_are_refused_before_any_launch():
    # quantize_kv zero-fills v8t up to whole 32-key chunks only with whole-chunk blocks; the Hopper kernel
    # reads v8t's width as S_pad, so a v of any other width (keys in model order, say), and v8t or scales
    # smaller than what the kernel reads, must not reach it
    pytest.importorskip("triton")
    from rainfusion_core.backends.triton.hopper import attention as ws
    from rainfusion_core.backends.triton.quantize import quantize_kv

    k = torch.randn(1, 1, 200, 64)
    with pytest.raises(ValueError, match="block must be a multiple of 32, got 16"):
        quantize_kv(k, k, torch.arange(200), 16)
    q = torch.randn(1, 1, 200, 64, dtype=torch.bfloat16)
    k8 = torch.zeros(1, 1, 200, 64, dtype=torch.float8_e4m3fn)
    v8t = torch.zeros(1, 1, 64, 224, dtype=torch.float8_e4m3fn)
    k_descale, v_descale = torch.ones(1, 1, 2), torch.ones(1, 1, 64)
    counts, indices = torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    bad = {  # the kernel reads v8t's rows (heads x D) and width as S_pad, and nb (D) scales per kv head
        "v": [(torch.zeros(1, 1, 64, 208, dtype=torch.float8_e4m3fn), r"\[1, 1, 64, 224\].*got .* \[1, 1, 64, 208\]$"),
              (v8t.transpose(2, 3).contiguous().transpose(2, 3), r"\(not contiguous\)"),
              (v8t[:, :, :32], r"got .* \[1, 1, 32, 224\]")],
        "k_descale": [(torch.ones(1, 1, 1), r"shape \[1, 1, 2\].*got torch.float32 \[1, 1, 1\]"),
                      (torch.ones(1, 1, 2, dtype=torch.float16), "got torch.float16")],
        "v_descale": [(torch.ones(1, 1, 32), r"shape \[1, 1, 64\].*got torch.float32 \[1, 1, 32\]")],
    }
    for name, cases in bad.items():
        for x, match in cases:
            args = {"v": v8t, "k_descale": k_descale, "v_descale": v_descale, name: x}
            with pytest.raises(ValueError, match=f"^{name}: expected a contiguous .*{match}"):
                ws.launch(q, k8, args["v"], torch.empty_like(q), counts, indices, torch.arange(200), 0.1,
                          args["k_descale"], args["v_descale"])
