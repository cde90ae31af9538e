import re
import subprocess
import sys
import textwrap

import pytest
import torch

import rainfusion_core as rf
from rainfusion_core.backends.torch_backend import TorchBackend
from helpers import needs_cpp


class FakeBackend(rf.Backend):
    """A CPU backend that doubles as a spy: it records calls and refuses what it is told to."""

    device_types = ("cpu",)

    def __init__(self, name, priority, unavailable=None, refuse=()):
        self.name, self.priority = name, priority
        self._unavailable, self._refuse, self.calls = unavailable, list(refuse), 0

    def unavailable_reason(self):
        return self._unavailable

    def unsupported_reasons(self, q, k, v, block_mask):
        return list(self._refuse)

    def forward(self, q, k, v, block_mask, scale):
        self.calls += 1
        return TorchBackend().forward(q, k, v, block_mask, scale)


@pytest.fixture
def fakes():
    """Register FakeBackends for one test; the registry (and its once-only warnings) is restored after it."""
    with rf.scoped_backends():
        yield lambda *args, **kwargs: rf.register_backend(FakeBackend(*args, **kwargs))


def _call():
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    return q, k, v, rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=64, q_len=64, kv_len=64)


def test_builtin_torch_backend_is_listed():
    rows = {row.name: row for row in rf.list_backends()}
    assert rows["torch"].available and rows["torch"].device_types == ("*",) and rows["torch"].reason == ""


def test_highest_priority_available_backend_wins(fakes):
    fast = fakes("fast_cpu", 50)
    assert rf.get_backend("cpu") is fast
    q, k, v, mask = _call()
    rf.block_sparse_attention(q, k, v, mask)
    assert fast.calls == 1


def test_automatic_selection_falls_back_with_one_warning(fakes):
    fakes("broken_cpu", 60, unavailable="its extension is not built")
    working = fakes("working_cpu", 50)
    q, k, v, mask = _call()
    with pytest.warns(RuntimeWarning, match=r"'broken_cpu' skipped on cpu \(its extension is not built\); using 'working_cpu'"):
        rf.block_sparse_attention(q, k, v, mask)
    assert working.calls == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.block_sparse_attention(q, k, v, mask)  # second time: silent


def test_unsupported_call_falls_back_to_next_candidate(fakes):
    picky = fakes("picky_cpu", 60, refuse=["head dim 16 is not supported"])
    working = fakes("working_cpu", 50)
    q, k, v, mask = _call()
    with pytest.warns(RuntimeWarning, match="head dim 16 is not supported"):
        rf.block_sparse_attention(q, k, v, mask)
    assert picky.calls == 0 and working.calls == 1


def test_explicit_backend_never_falls_back(fakes):
    fakes("broken_cpu", 50, unavailable="its extension is not built")
    fakes("picky_cpu", 40, refuse=["head dim 16 is not supported"])
    q, k, v, mask = _call()
    with pytest.raises(rf.BackendUnavailableError, match="'broken_cpu' is unavailable: its extension is not built"):
        rf.block_sparse_attention(q, k, v, mask, backend="broken_cpu")
    with pytest.raises(rf.UnsupportedInputError, match="'picky_cpu' cannot run this call: head dim 16"):
        rf.block_sparse_attention(q, k, v, mask, backend="picky_cpu")
    with pytest.raises(rf.BackendUnavailableError):
        rf.get_backend("broken_cpu")


def test_explicit_backend_on_the_wrong_device(fakes):
    class CudaOnly(FakeBackend):
        device_types = ("cuda",)

    rf.register_backend(CudaOnly("gpu_only", 10))
    try:
        q, k, v, mask = _call()
        with pytest.raises(rf.UnsupportedInputError, match="'gpu_only' runs on cuda devices, but the inputs are on cpu"):
            rf.block_sparse_attention(q, k, v, mask, backend="gpu_only")
    finally:
        rf.unregister_backend("gpu_only")


def test_nothing_fits_lists_every_candidate(fakes, monkeypatch):
    fakes("broken_cpu", 50, unavailable="its extension is not built")
    for backend in rf.registered_backends():
        if not isinstance(backend, FakeBackend):
            monkeypatch.setattr(type(backend), "unsupported_reasons", lambda self, *a: ["pretend refusal"])
    q, k, v, mask = _call()
    with pytest.raises(rf.BackendError, match=r"(?s)no backend can run on cpu.*broken_cpu: its extension.*torch: pretend"):
        rf.block_sparse_attention(q, k, v, mask)


@needs_cpp
def test_name_keyword_reaches_a_backend_named_like_a_device():
    cpu = rf.get_backend(name="cpu")
    assert cpu.name == "cpu" and cpu.device_types == ("cpu",)
    assert rf.get_backend("cpu").name in ("cpu", "torch")  # "cpu" alone is the device


def test_registration_errors(fakes):
    fakes("dup_cpu", 1)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        rf.register_backend(FakeBackend("dup_cpu", 2))
    with pytest.raises(ValueError, match="backend.name must be lowercase"):
        rf.register_backend(FakeBackend("Bad Name", 2))
    with pytest.raises(TypeError, match="expected a rainfusion_core.Backend"):
        rf.register_backend(lambda: 42)
    with pytest.raises(rf.UnknownBackendError, match="no backend named 'nope'"):
        rf.unregister_backend("nope")


def test_entry_point_plugins_load_lazily(tmp_path):
    """A package on sys.path with entry points is picked up on first registry use, not at import."""
    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent("""
        import rainfusion_core as rf
        from rainfusion_core.backends.torch_backend import masked_attention

        class ToyBackend(rf.Backend):
            name, device_types, priority = "toy", ("cpu",), 70
            def forward(self, q, k, v, block_mask, scale):
                return masked_attention(q, k, v, block_mask, scale)

        def make():
            return ToyBackend()
    """))
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('vendor SDK missing')\n")
    dist = tmp_path / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[rainfusion_core.backends]\ntoy = toy_plugin:make\nbroken = broken_plugin:Backend\n"
    )
    script = textwrap.dedent("""
        import sys, torch
        import rainfusion_core as rf
        assert "toy_plugin" not in sys.modules, "plugins must not load at import"
        rows = {r.name: r for r in rf.list_backends()}
        assert rows["toy"].available and rows["toy"].priority == 70, rows
        assert not rows["broken"].available and "vendor SDK missing" in rows["broken"].reason, rows
        assert rf.get_backend("cpu").name == "toy"
        q = torch.randn(1, 1, 64, 8)
        mask = rf.BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=64, q_len=64, kv_len=64)
        rf.block_sparse_attention(q, q, q, mask, backend="toy")
        try:
            rf.get_backend("broken")
        except rf.BackendUnavailableError as e:
            assert "vendor SDK missing" in str(e)
        else:
            raise AssertionError("broken plugin was returned")
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_does_no_backend_work():
    script = "import sys, rainfusion_core; print(sorted(m for m in sys.modules if m.startswith('rainfusion_core.backends')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_scoped_backends_restores_the_registry():
    before = [b.name for b in rf.registered_backends()]
    with rf.scoped_backends(FakeBackend("scoped_cpu", 55)) as (fake,):
        assert rf.get_backend("cpu") is fake
        rf.unregister_backend("torch")  # removals inside the block are undone too
        assert "torch" not in [b.name for b in rf.registered_backends()]
    assert [b.name for b in rf.registered_backends()] == before
    assert rf.get_backend("cpu").name != "scoped_cpu"


@pytest.mark.parametrize("hook, reason", [
    (lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("reasons exploded")),
     "its unsupported_reasons() raised RuntimeError: reasons exploded"),
    (lambda self, *a, **k: "not a list", "its unsupported_reasons() returned str 'not a list'"),
    (lambda self, *a, **k: None, "its unsupported_reasons() returned NoneType None"),
])
def test_a_broken_unsupported_reasons_hook_is_a_named_refusal(hook, reason):
    from rainfusion_core.backends.torch_backend import TorchBackend

    class Broken(TorchBackend):
        name = "broken_hook"
        device_types = ("cpu",)
        priority = 1000
        unsupported_reasons = hook

    q = torch.randn(1, 2, 64, 16)
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=64, q_len=64, kv_len=64)
    with rf.scoped_backends(Broken()):
        with pytest.warns(RuntimeWarning, match="backend 'broken_hook' skipped"):
            out = rf.block_sparse_attention(q, q, q, mask)  # automatic selection goes on to the next backend
        torch.testing.assert_close(out, rf.block_sparse_attention(q, q, q, mask, backend="torch"))
        expected = re.escape(f"backend 'broken_hook' cannot run this call: {reason}")
        with pytest.raises(rf.UnsupportedInputError, match=expected):
            rf.block_sparse_attention(q, q, q, mask, backend="broken_hook")


def test_a_call_consults_the_registry_once_and_a_plan_once_per_class_of_inputs(monkeypatch):
    from rainfusion_core import ops

    calls = []
    real = ops.select_backend
    monkeypatch.setattr(ops, "select_backend", lambda *a, **k: calls.append(1) or real(*a, **k))
    layout = rf.VideoLayout(3, 8, 16)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32) for _ in range(3))
    rf.sparse_attention(q, k, v, layout, sparsity=0.5, block_size=32, min_tokens=0)
    assert len(calls) == 1  # one choice serves the prediction and the attention
    plan = rf.plan_sparse_attention(q, k, layout, sparsity=0.5, block_size=32)
    calls.clear()
    first = plan.run(q, k, v)
    assert len(calls) == 1
    for _ in range(3):
        torch.testing.assert_close(plan.run(q, k, v), first, rtol=0, atol=0)
    assert len(calls) == 1  # later runs of the same class of inputs ask nothing
    plan.run(q.double(), k.double(), v.double())
    assert len(calls) == 2  # another dtype is another class
    with rf.scoped_backends(type("Another", (TorchBackend,), {"name": "another_one"})()):
        plan.run(q, k, v)  # the registry changed: choose again
    assert len(calls) == 3
