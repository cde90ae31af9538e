"""What a new user sees first: the demo's printed fields and the command line's errors and help."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import needs_cpp

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, RAINFUSION_PROGRESS="0")


def rainfusion(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rainfusion_core", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@needs_cpp
def test_demo_prints_backend_instruction_set_density_and_an_honest_speed_up():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--device", "cpu", "--frames", "5",
                          "--height", "8", "--width", "16", "--heads", "2", "--repeats", "1"],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"^backend cpu \(C\++ kernel: (AVX-512F|AVX2|generic)[^,]*, (OpenMP, \d+ "
                     r"threads|no OpenMP, 1 thread)\)$", out, re.M), out
    density = float(re.search(r"density (\d\.\d+) of the tiles kept", out).group(1))
    assert 0 < density < 1
    dense_ms = float(re.search(r"^dense SDPA\s+([\d.]+)$", out, re.M).group(1))
    sparse_ms = float(re.search(r"^rf\.sparse_attention \(permute, predict, attend\)\s+([\d.]+)$", out, re.M).group(1))
    speed_up = re.search(r"^speed-up over dense\s+([\d.]+)x  \(sparse is (faster|SLOWER)\)$", out, re.M)
    assert speed_up and abs(float(speed_up.group(1)) - dense_ms / sparse_ms) < 0.02
    assert (speed_up.group(2) == "faster") == (dense_ms > sparse_ms)
    assert float(re.search(r"vs float64 golden\s+: ([\d.e+-]+)", out).group(1)) < 1e-4


def test_demo_default_shape_has_video_dit_density():
    """The default CPU shape keeps about what video DiTs keep at sparsity 0.8 (not a sink-dominated mask)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from demo import CPU_SHAPE
    finally:
        sys.path.pop(0)
    import rainfusion_core as rf
    from rainfusion_core.synthetic import video_like_qkv

    layout = rf.VideoLayout(CPU_SHAPE["frames"], CPU_SHAPE["height"], CPU_SHAPE["width"])
    q, k, _ = video_like_qkv(layout, CPU_SHAPE["heads"], CPU_SHAPE["head_dim"], seed=0)
    density = rf.plan_sparse_attention(q, k, layout, sparsity=0.8).density
    assert 0.24 <= density <= 0.32, density


def test_help_is_instant_and_never_imports_torch():
    script = ("import sys\nfrom rainfusion_core.cli import build_parser\n"
              "try:\n    build_parser().parse_args(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch' in sys.modules)")
    for args in (["--help"], ["mask", "--help"], ["bench", "--help"], ["mask", "--head", "-1"]):
        run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV)
        assert run.stdout.strip().splitlines()[-1] == "False", (args, run.stdout)
    start = time.perf_counter()
    run = rainfusion("--help")
    assert run.returncode == 0 and time.perf_counter() - start < 3.0


def test_help_texts_and_defaults_are_shown():
    run = rainfusion("mask", "--help")
    assert "--block-size BLOCK_SIZE" in run.stdout and "tokens per block (default: 128)" in run.stdout
    run = rainfusion("bench", "--help")
    text = " ".join(run.stdout.split())
    assert "comma-separated sparsities in [0, 1) (default: 0.5,0.8,0.9)" in text
    # a default is said once, and never as "None"
    assert "(default: None)" not in text and "(default: the best device present)" in text
    assert text.count("(default:") == len(re.findall(r"\(default: [^)]*\)", text))
    for command in ("info", "parity", "bench", "mask", "evaluate"):
        help_text = " ".join(rainfusion(command, "--help").stdout.split())
        assert "(default: None)" not in help_text and not re.search(r"\(default: [^)]*\) \(default:", help_text)
    run = rainfusion("--help")
    for command in ("info", "parity", "bench", "mask", "evaluate"):
        assert re.search(rf"^\s+{command}\s+\S", run.stdout, re.M), command


def in_process(capsys, *args):
    """``(exit status, stderr)`` of the command line's ``main`` run in this process: the cases below share one
    torch import instead of paying one per subprocess. An exception escaping ``main`` fails the test."""
    from rainfusion_core.cli import main

    capsys.readouterr()
    status = main(list(args))
    return status, capsys.readouterr().err


def _one_line_error(status, stderr, *fragments):
    assert status == 2, (status, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_errors_are_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAINFUSION_PROGRESS", "0")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    grid = ["--frames", "2", "--height", "8", "--width", "8"]
    cases = [
        (["evaluate", "--qkv", str(tmp_path / "missing.pt")], "--qkv", "no such file"),
        (["evaluate", "--qkv", str(tmp_path)], "--qkv", "is a directory"),
        (["evaluate", "--qkv", str(text)], "--qkv", "not a rainfusion q/k/v capture"),
        (["mask", *grid, "--block-size", "0"], "--block-size", "must be >= 1, got 0"),
        (["evaluate", "--synthetic", "2,8,8", "--heads", "0"], "--heads", "must be >= 1, got 0"),
        (["parity", "--backend", "torch", "--dtypes", "float8"], "--dtypes", "unknown dtype 'float8'"),
        (["mask", *grid, "--head", "-1"], "--head", "must be >= 0, got -1"),
        (["mask", *grid, "--out", str(tmp_path)], "--out", "is a directory"),
        (["mask", *grid, "--sparsity", "1.5"], "--sparsity", "must be in [0, 1)"),
        (["bench", "--shape", "1,2"], "--shape", "expected 6 positive integers"),
        (["evaluate", "--synthetic", "2,8"], "--synthetic", "expected 3 positive integers"),
        (["parity"], "give --backend NAME or --all"),
        (["parity", "--backend", "no_such_backend"], "unknown backend 'no_such_backend'"),
        (["bench", "--device", "cuda:99"], "--device cuda:99", "not present on this machine"),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", "--device", "cuda"], "--device cuda", "not present on this machine"))
    run = rainfusion(*cases[0][0])  # the installed entry point once; then main() in this process
    _one_line_error(run.returncode, run.stderr, *cases[0][1:])
    for args, *fragments in cases:
        _one_line_error(*in_process(capsys, *args), *fragments)


def test_mask_out_without_suffix_reports_the_file_it_wrote(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    target = tmp_path / "picture"
    run = rainfusion("mask", "--frames", "2", "--height", "16", "--width", "16", "--out", str(target))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "picture.png").exists() and not target.exists()
    assert f"written to {target}.png" in run.stdout and "black = kept" in run.stdout


@needs_cpp
def test_bench_names_the_backend_and_the_density():
    run = rainfusion("bench", "--device", "cpu", "--shape", "1,2,4,8,16,32", "--sparsity", "0.8,0.9",
                     "--repeats", "1")
    assert run.returncode == 0, run.stderr
    assert re.search(r"backend cpu \(.*threads?\)", run.stdout), run.stdout
    assert len(re.findall(r"sparsity 0\.\d0: density 0\.\d+", run.stdout)) == 2, run.stdout


def test_conformance_suite_for_an_unusable_backend_fails_in_one_line(tmp_path):
    env = dict(ENV, RAINFUSION_BACKEND="no_such_backend")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
                          "rainfusion_core.conformance"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 1, run.stdout
    assert "Traceback" not in run.stdout and "rainfusion_core/conformance.py:" not in run.stdout
    lines = [line for line in run.stdout.splitlines() if "RAINFUSION_BACKEND=no_such_backend" in line]
    assert lines and "unknown backend 'no_such_backend'" in lines[0]


def test_long_commands_show_progress_on_stderr_unless_hidden():
    args = [sys.executable, "-m", "rainfusion_core", "parity", "--backend", "torch", "--quick", "--dtypes", "float64"]
    shown = subprocess.run(args, capture_output=True, text=True, env=dict(ENV, RAINFUSION_PROGRESS="1"), timeout=300)
    assert shown.returncode == 0 and "parity torch:" in shown.stderr and "case/s" in shown.stderr
    assert "parity torch:" not in shown.stdout  # the table on stdout stays clean
    hidden = subprocess.run(args, capture_output=True, text=True, env=dict(ENV, RAINFUSION_PROGRESS="0"), timeout=300)
    assert hidden.returncode == 0 and hidden.stderr == ""


def test_cli_sizes_seeds_and_capture_files_fail_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAINFUSION_PROGRESS", "0")
    bad_q, bad_layout = tmp_path / "q-is-text.pt", tmp_path / "layout-is-list.pt"
    ok = {"q": torch.zeros(1, 1, 8, 4), "k": torch.zeros(1, 1, 8, 4), "v": torch.zeros(1, 1, 8, 4),
          "layout": {"frames": 1, "height": 2, "width": 4}}
    torch.save(dict(ok, q="not a tensor"), bad_q)
    torch.save(dict(ok, layout=[1, 2, 4]), bad_layout)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    cases = [
        (["bench", "--shape", "1,1,100000,100000,100000,64"], "--shape: this shape needs at least"),
        (["mask", "--frames", "2", "--height", "8", "--width", "8", "--head", "100000000000"], "--head: this shape"),
        (["evaluate", "--synthetic", "2,8,8", "--head-dim", "100000000000000"], "--head-dim: this shape needs"),
        (["evaluate", "--synthetic", "2,8,8", "--seed", str(10 ** 30)], "argument --seed: must be below 2**63"),
        (["evaluate", "--qkv", str(bad_q)], "q is a str, not a tensor"),
        (["evaluate", "--qkv", str(bad_layout)], "layout is a list, not the dict save_qkv writes"),
        (["evaluate", "--qkv", str(pipe)], "is not a regular file"),
        (["mask", "--frames", "2", "--height", "8", "--width", "8", "--out", ""], "--out '': give a file name"),
    ]
    for args, expected in cases:
        _one_line_error(*in_process(capsys, *args), expected)


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "argument --frames: must be >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--sparsity", "1.5"], "argument --sparsity: must be in [0, 1), got 1.5"),
])
def test_demo_refuses_a_bad_option_in_one_line(args, message):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), *args], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert run.returncode == 2 and run.stderr.splitlines()[-1].endswith(message), run.stderr
    assert "Traceback" not in run.stderr
