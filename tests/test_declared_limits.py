"""What a backend declares as data (``rainfusion_core.limits``) and the one precision table.

The registry composes every backend's refusals from its declared ``dtypes``, ``head_dims``,
``block_multiple`` and ``precision_limits``, worded the same for every backend, and asks the
``unsupported_reasons`` hook only for calls the data allows. Precisions are rows of
``rainfusion_core.precision.TABLE``; no other module compares precision names.
"""
import ast
import pathlib

import pytest
import torch

import rainfusion_core as rf
from rainfusion_core import precision
from rainfusion_core.backend import Backend
from rainfusion_core.backends.torch_backend import masked_attention
from rainfusion_core.limits import Limits
from rainfusion_core.registry import refusal_reasons
from rainfusion_core.testing import kit_head_dims

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Declared(Backend):
    """Computes float16/float32, head dims 32 and 64, blocks of a multiple of 32; records its hook's calls."""

    name = "declared_cpu"
    device_types = ("cpu",)
    priority = 90
    dtypes = (torch.float16, torch.float32)
    head_dims = (32, 64)
    block_multiple = 32
    precisions = ("bf16", "fp8")
    precision_limits = {"fp8": Limits(dtypes=(torch.float16,), block_sizes=(64,))}

    def __init__(self):
        self.asked = []

    def unsupported_reasons(self, q, k, v, block_mask, precision="bf16"):
        self.asked.append((q.dtype, q.shape[-1], block_mask.block_size, precision))
        return []

    def forward(self, q, k, v, block_mask, scale, precision="bf16"):
        return masked_attention(q, k, v, block_mask, scale)


def _call(dtype=torch.float32, dim=32, block=64, length=128):
    q = torch.randn(1, 2, length, dim, dtype=dtype)
    nb = -(-length // block)
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, nb, nb, dtype=torch.bool), block_size=block, q_len=length,
                                   kv_len=length)
    return q, mask


@pytest.mark.parametrize("dtype, dim, block, prec, reason", [
    (torch.float64, 32, 64, "bf16", "dtype torch.float64 is not supported (float16, float32 are)"),
    (torch.float32, 48, 64, "bf16", "head dim 48 is not supported (32, 64 are)"),
    (torch.float32, 32, 48, "bf16", "mask block size 48 is not a multiple of 32"),
    (torch.float32, 32, 64, "fp8", "in fp8, dtype torch.float32 is not supported (float16 are)"),
    (torch.float16, 32, 128, "fp8", "in fp8, mask block size 128 is not supported (64 are)"),
])
def test_declared_data_refuses_with_one_wording_and_the_hook_is_not_asked(dtype, dim, block, prec, reason):
    backend = Declared()
    q, mask = _call(dtype, dim, block)
    assert refusal_reasons(backend, q, q, q, mask, prec) == [reason]
    assert backend.asked == []  # the data said no: the hook is never asked
    with rf.scoped_backends(backend):
        with pytest.raises(rf.UnsupportedInputError, match=r"backend 'declared_cpu' cannot run this call: "):
            rf.block_sparse_attention(q, q, q, mask, backend="declared_cpu", precision=prec)


def test_a_call_the_data_allows_is_asked_of_the_hook_once_with_its_precision():
    backend = Declared()
    q, mask = _call(torch.float16, 64, 64)
    with rf.scoped_backends(backend):
        rf.block_sparse_attention(q, q, q, mask, backend="declared_cpu", precision="fp8")
    assert backend.asked == [(torch.float16, 64, 64, "fp8")]


def test_automatic_selection_skips_a_backend_its_data_refuses_and_says_why():
    q, mask = _call(torch.float64, 32, 64)
    with rf.scoped_backends(Declared()):
        with pytest.warns(RuntimeWarning, match="'declared_cpu' skipped on cpu \\(dtype torch.float64 is not"):
            rf.block_sparse_attention(q, q, q, mask)


@pytest.mark.parametrize("attribute, value, message", [
    ("dtypes", ("float16",), "dtypes must be None or a non-empty tuple of torch dtypes"),
    ("head_dims", (64, 0), "head_dims must be None, a non-empty tuple of positive ints or a range"),
    ("block_multiple", 0, "block_multiple must be a positive int"),
    ("precision_limits", {"fp8": (torch.float16,)}, "precision_limits must map precisions it offers"),
    ("precision_limits", {"bf16": Limits()}, "precision_limits must map precisions it offers other than 'bf16'"),
    ("precision_limits", {"fp8": Limits(block_sizes=())}, "block_sizes must be None, a non-empty tuple"),
])
def test_a_bad_declaration_is_refused_at_registration(attribute, value, message):
    backend = Declared()
    setattr(backend, attribute, value)
    with pytest.raises(ValueError, match=message):
        with rf.scoped_backends(backend):
            pass


def test_the_built_in_backends_declare_what_they_compute():
    triton, npu, cpu = (rf.registry._by_name(n) for n in ("triton", "npu", "cpu"))
    assert triton.head_dims == range(16, 257) and triton.block_multiple == 16
    assert npu.head_dims == (64, 128) and npu.block_multiple == 128 and npu.dtypes == (torch.float16, torch.bfloat16)
    assert cpu.dtypes is not None and torch.float64 in cpu.dtypes
    # the conformance kit: the dims a backend lists, else those of 32, 64, 128 its range holds
    assert kit_head_dims(triton) == (32, 64, 128) and kit_head_dims(npu) == (64, 128)
    assert kit_head_dims(cpu) == (32, 64, 128)


def test_the_triton_fp8_limits_are_the_hopper_kernels():
    pytest.importorskip("triton")
    from rainfusion_core.backends.triton.hopper import attention as hopper

    fp8 = rf.registry._by_name("triton").precision_limits["fp8"]
    assert fp8.head_dims == hopper.SUPPORTED_HEAD_DIMS and fp8.block_sizes == (hopper.BLOCK,)
    assert set(fp8.dtypes) == {torch.float16, torch.bfloat16}


# --------------------------------------------------------------------------- the precision table
def test_every_precision_is_one_row_of_the_table():
    assert precision.PRECISIONS == tuple(precision.TABLE) and precision.PRECISIONS[0] == precision.DEFAULT_PRECISION
    default = precision.get_precision(precision.DEFAULT_PRECISION)
    assert default.is_default and default.reference is None and default.operand_dtype is None
    fp8 = precision.get_precision("fp8")
    assert fp8.operand_dtype == torch.float8_e4m3fn and fp8.reference is not None and fp8.needs
    assert fp8.backend_keywords() == {"precision": "fp8"} and default.backend_keywords() == {}
    from rainfusion_core.quality import VARIANTS

    assert set(fp8.evaluator_rows) <= set(VARIANTS)


def test_the_cli_offers_the_tables_precisions():
    from rainfusion_core.cli import build_parser

    parser = build_parser()
    for command in ("bench", "parity"):
        sub = parser._subparsers._group_actions[0].choices[command]
        (action,) = [a for a in sub._actions if a.dest == "precision"]
        assert tuple(action.choices) == precision.PRECISIONS and action.default == precision.DEFAULT_PRECISION


def _compared_precision_names(path: pathlib.Path) -> list[str]:
    """``x == "fp8"``, ``x in ("bf16", "fp8")`` and the like in one source file: a precision matched by name."""
    names = set(precision.PRECISIONS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_module_but_the_table_matches_a_precision_by_name():
    sources = [*ROOT.joinpath("rainfusion_core").rglob("*.py"), *ROOT.joinpath("backends").rglob("*.py")]
    assert len(sources) > 30
    found = [hit for path in sources for hit in _compared_precision_names(path)
             if not path.name == "precision.py"]
    assert found == []
