"""No public input makes a kernel read or write out of bounds.

* A hand-built ``BlockMask`` whose index view is out of range, unsorted,
  repeated, or disagrees with ``dense`` is refused at construction.
* A mask edited in place after construction reaches the kernels anyway: the
  C++ binding refuses it, the Triton kernel clamps every index it loads. Each
  of these runs in a subprocess, so a crash shows as a signal, not as a dead
  test runner.
* The C++ kernel runs clean under AddressSanitizer (``tools/asan_cpu_kernel.py``).
* Memory follows the sequence length, not ``block_size``.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rainfusion_core as rf
from helpers import needs_cpp

ROOT = Path(__file__).resolve().parent.parent


def _parts(nq=2, nk=2, count=2):
    dense = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    counts = torch.full((1, 1, nq), count, dtype=torch.int32)
    indices = torch.arange(nk, dtype=torch.int32).expand(1, 1, nq, nk).contiguous()
    return dense, counts, indices


def _edit(name):
    dense, counts, indices = _parts(nq=2, nk=3, count=3)
    if name == "negative-index":
        indices[0, 0, 1, 2] = -100000
    elif name == "index-past-nk":
        indices[0, 0, 1, 2] = 3
    elif name == "unsorted":
        indices[0, 0, 1] = torch.tensor([0, 2, 1])
    elif name == "repeated":
        indices[0, 0, 1] = torch.tensor([0, 1, 1])
    elif name == "count-past-nk":
        counts[0, 0, 1] = 4
    elif name == "negative-count":
        counts[0, 0, 1] = -1
    elif name == "dense-disagrees":
        dense[0, 0, 1, 2] = False
    elif name == "indices-miss-a-kept-block":
        counts[0, 0, 1] = 2
    return dense, counts, indices


REFUSALS = {
    "negative-index": r"kv_indices\[0, 0, 1, 2\] = -100000 is outside \[0, NK=3\)",
    "index-past-nk": r"kv_indices\[0, 0, 1, 2\] = 3 is outside \[0, NK=3\)",
    "unsorted": r"kv_indices\[0, 0, 1, 2\] = 1 does not follow 2",
    "repeated": r"kv_indices\[0, 0, 1, 2\] = 1 does not follow 1",
    "count-past-nk": r"kv_counts\[0, 0, 1\] = 4 is outside \[0, NK=3\]",
    "negative-count": r"kv_counts\[0, 0, 1\] = -1 is outside \[0, NK=3\]",
    "dense-disagrees": r"BlockMask.dense\[0, 0, 1, 2\] does not keep key block 2 but kv_indices\[0, 0, 1, :kv_counts\] lists",
    "indices-miss-a-kept-block": r"BlockMask.dense\[0, 0, 1, 2\] keeps key block 2 but kv_indices\[0, 0, 1, :kv_counts\] "
                                 r"does not list",
}


@pytest.mark.parametrize("name", REFUSALS)
def test_hand_built_mask_with_a_bad_index_view_is_refused_naming_field_and_position(name):
    with pytest.raises(ValueError, match=REFUSALS[name]):
        rf.BlockMask(*_edit(name), 128, 200, 300)


def test_a_consistent_hand_built_mask_is_accepted_entries_past_the_count_are_free():
    dense, counts, indices = _parts(nq=2, nk=3, count=3)
    dense[0, 0, 0, 1] = False
    counts[0, 0, 0] = 2
    indices[0, 0, 0] = torch.tensor([0, 2, -7])  # the slot past the count is unspecified
    mask = rf.BlockMask(dense, counts, indices, 128, 200, 300)
    assert mask.kv_counts.tolist() == [[[2, 3]]]


def test_fields_of_the_wrong_type_are_named():
    dense, counts, indices = _parts()
    with pytest.raises(TypeError, match="BlockMask.kv_counts must be a torch.Tensor, got a list"):
        rf.BlockMask(dense, counts.tolist(), indices, 128, 256, 256)


def test_library_built_masks_skip_the_content_check(monkeypatch):
    from rainfusion_core import block_mask

    def refuse(*args):
        raise AssertionError("contents re-checked")

    monkeypatch.setattr(block_mask, "_check_contents", refuse)
    layout = rf.VideoLayout(frames=3, height=8, width=8)
    q = torch.randn(1, 2, layout.seq_len, 16)
    mask = rf.predict_block_mask(q, q, layout, sparsity=0.5, block_size=32)
    mask.to("cpu")
    rf.BlockMask.from_dense(mask.dense, block_size=32, q_len=layout.seq_len, kv_len=layout.seq_len)
    rf.sparse_attention(q, q, q, layout, sparsity=0.5, block_size=32, backend="torch")
    with pytest.raises(AssertionError, match="re-checked"):
        rf.BlockMask(mask.dense, mask.kv_counts, mask.kv_indices, 32, layout.seq_len, layout.seq_len)


# --------------------------------------------------------------------------- reproducers, in subprocesses
REPRODUCER = textwrap.dedent("""
    import sys, torch
    import rainfusion_core as rf
    backend, device = sys.argv[1], sys.argv[2]
    q = torch.randn(1, 1, 256, 32, device=device)
    idx = torch.full((1, 1, 2, 2), -100000, dtype=torch.int32)
    try:
        rf.BlockMask(torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.full((1, 1, 2), 2, dtype=torch.int32), idx,
                     128, 256, 256)
    except ValueError as exc:
        print("REFUSED-AT-CONSTRUCTION", exc)
    # The same damage done in place after construction reaches the backend.
    for name, field, value in (("negative", "kv_indices", -100000), ("huge", "kv_indices", 2**31 - 1),
                               ("past-nk", "kv_indices", 2), ("count", "kv_counts", 1000),
                               ("negative-count", "kv_counts", -5)):
        m = rf.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device), block_size=128,
                                    q_len=250, kv_len=250)
        getattr(m, field).fill_(value)
        try:
            out = rf.block_sparse_attention(q[:, :, :250], q[:, :, :250], q[:, :, :250], m, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()  # a fault in the kernel surfaces here
            print("RAN", name, bool(torch.isfinite(out).all()))
        except ValueError as exc:
            print("REFUSED", name, exc)
    print("SURVIVED")
""")


MUTATED_MID_CALL = textwrap.dedent("""
    import random, sys, threading, time, torch
    import rainfusion_core as rf
    torch.manual_seed(0)
    q = torch.randn(1, 4, 2048, 64)
    mask = rf.BlockMask.from_dense(torch.rand(1, 4, 32, 32) < 0.5, block_size=64, q_len=2048, kv_len=2048)
    good_counts, good_indices = mask.kv_counts.clone(), mask.kv_indices.clone()

    def burst(i):
        edits[0] += go.is_set()  # edits made while a call runs
        mask.kv_indices.fill_(values[i % 4])
        mask.kv_counts.fill_(values[(i + 1) % 4])
        mask.kv_indices.copy_(good_indices)
        mask.kv_counts.copy_(good_counts)

    def vandal():  # another thread edits the mask in place while a call runs
        rng, i, seen = random.Random(0), 0, -1
        while not stop.is_set():
            if not go.wait(0.01) or calls[0] == seen:
                time.sleep(0.0002)
                continue
            seen = calls[0]  # one visit per call
            if storm.is_set():  # edits all through the call: its checks see some of them
                while go.is_set() and calls[0] == seen:
                    burst(i)
                    i += 1
                continue
            time.sleep(rng.uniform(0, 0.02))  # one short burst at a random moment: mostly during its kernel
            for _ in range(4):
                burst(i)
                i += 1

    values, edits, calls = (-10 ** 6, 2 ** 30, -1, 32), [0], [0]
    stop, go, storm = threading.Event(), threading.Event(), threading.Event()
    thread = threading.Thread(target=vandal)
    thread.start()
    ran = refused = 0
    try:
        for call in range(int(sys.argv[1])):
            (storm.set if call % 2 else storm.clear)()
            calls[0] = call
            go.set()
            if storm.is_set():
                time.sleep(0.001)  # the storm has begun
            try:
                rf.block_sparse_attention(q, q, q, mask, backend="cpu")
                ran += 1
            except ValueError:
                refused += 1
            finally:
                go.clear()
    finally:
        stop.set()
        thread.join()
    print("SURVIVED", ran, refused, edits[0])
""")


@needs_cpp
def test_a_mask_edited_by_another_thread_mid_call_never_crashes_the_cpu_kernel():
    # The binding checks the mask, then the kernel reads the checked copy, never the caller's tensors.
    run = subprocess.run([sys.executable, "-c", MUTATED_MID_CALL, "200"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, RAINFUSION_PROGRESS="0", OMP_NUM_THREADS="2"))
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-3000:]}"
    ran, refused, edits = map(int, run.stdout.split()[1:4])
    assert ran + refused == 200 and ran > 0 and edits >= 200, run.stdout  # the kernel ran while the mask changed


def _where(backend):
    """Device and environment of a subprocess: Triton on the GPU when there is one, else its interpreter."""
    env = dict(os.environ, RAINFUSION_PROGRESS="0")
    if backend != "triton":
        return "cpu", env
    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
        return "cuda", env
    return "cpu", dict(env, TRITON_INTERPRET="1")


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpp), "torch", "triton"])
def test_hostile_masks_never_crash_the_process(backend):
    device, env = _where(backend)
    run = subprocess.run([sys.executable, "-c", REPRODUCER, backend, device], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert "REFUSED-AT-CONSTRUCTION BlockMask.kv_indices[0, 0, 0, 0] = -100000" in run.stdout
    assert "SURVIVED" in run.stdout
    if backend == "cpu":  # the binding checks what it receives
        assert run.stdout.count("REFUSED ") == 5, run.stdout
        assert "kv_indices[0, 0, 0, 0] = -100000 is outside [0, NK=2)" in run.stdout
        assert "kv_counts[0, 0, 0] = 1000 is outside [0, NK=2]" in run.stdout
    if backend == "triton":  # the kernel clamps what it loads: it runs, inside its inputs
        assert run.stdout.count("RAN ") == 5, run.stdout


def _asan_tool():
    spec = importlib.util.spec_from_file_location("asan_cpu_kernel", ROOT / "tools" / "asan_cpu_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cpp
def test_cpu_kernel_is_clean_under_address_sanitizer():
    missing = _asan_tool().missing_runtime()
    if missing is not None:  # a tool this machine lacks: a skip with its reason, not a failure
        pytest.skip(f"needs the compiler's AddressSanitizer runtime: {missing}")
    pytest.importorskip("pybind11", reason="needs pybind11 to build the sanitized kernel (pip install pybind11)")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "asan_cpu_kernel.py"), "--quick"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-5000:]
    assert "-> PASS" in run.stdout and "AddressSanitizer: no error reported" in run.stdout
    assert run.stdout.count("refused (") == 5


# --------------------------------------------------------------------------- memory follows S
HUGE_BLOCK = textwrap.dedent("""
    import resource, sys, torch
    import rainfusion_core as rf
    backend, device = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, device=device) for _ in range(3))
    def run(block):
        mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool, device=device), block_size=block,
                                       q_len=256, kv_len=256)
        return rf.block_sparse_attention(q, k, v, mask, backend=backend)
    def peak_mb():  # host peak RSS, or the GPU's peak allocation
        if device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    small = run(256)  # warm up at a block size that covers the sequence
    before = peak_mb()
    huge = run(2 ** 22)
    grown_mb = peak_mb() - before
    print("GROWN_MB", grown_mb)
    print("SAME", bool(torch.allclose(small, huge, atol=1e-6)))
""")


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpp), "torch", "triton"])
def test_a_block_size_far_beyond_the_sequence_costs_no_memory(backend):
    device, env = _where(backend)
    run = subprocess.run([sys.executable, "-c", HUGE_BLOCK, backend, device], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    values = dict(line.split() for line in run.stdout.splitlines() if line.split()[0] in ("GROWN_MB", "SAME"))
    assert values["SAME"] == "True"
    assert float(values["GROWN_MB"]) < 64, run.stdout  # 2**22 tokens per block used to take 2.4 GB


HUGE_BLOCK_EVALUATE = textwrap.dedent("""
    import resource, torch
    import rainfusion_core as rf
    torch.set_num_threads(1)  # one summation order: P's rounding to float8 turns any other into a visible difference
    from rainfusion_core.fp8 import fp8_reference_attention
    from rainfusion_core.quality import evaluate
    layout = rf.VideoLayout(2, 8, 8)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 64) for _ in range(3))
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    def both(block):
        mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=block, q_len=128,
                                       kv_len=128)
        return fp8_reference_attention(q, k, v, mask, 0.1), evaluate(q, k, v, layout, sparsities=(0.5,),
                                                                    block_size=block)
    small, _ = both(128)
    before = peak()
    huge, _ = both(2 ** 22)
    print("GROWN_MB", peak() - before)
    print("SAME", bool(torch.equal(small, huge)))
""")


def test_the_fp8_reference_and_the_evaluator_take_no_memory_from_a_huge_block():
    run = subprocess.run([sys.executable, "-c", HUGE_BLOCK_EVALUATE], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, RAINFUSION_PROGRESS="0"))
    assert run.returncode == 0, run.stderr[-3000:]
    values = dict(line.split() for line in run.stdout.splitlines() if line.split()[0] in ("GROWN_MB", "SAME"))
    assert values["SAME"] == "True"
    assert float(values["GROWN_MB"]) < 64, run.stdout  # 2**22 tokens per block took 6.7 GB


def test_token_mask_is_built_at_token_scale():
    mask = rf.BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=2 ** 30, q_len=5, kv_len=7)
    assert mask.token_mask().shape == (1, 1, 5, 7)
    assert mask.token_mask(2, 4).shape == (1, 1, 2, 7)
