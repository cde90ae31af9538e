"""The ``rainfusion`` command and the example plugin package (installed by .ci/setup)."""
import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

import rainfusion_core as rf
from rainfusion_core.cli import main
from rainfusion_core.testing import check_backend, default_cases
from helpers import needs_cpp

PLUGIN = pytest.mark.skipif(
    importlib.util.find_spec("rainfusion_example_plugin") is None,
    reason="the example plugin is not installed: pip install -e examples/rainfusion-example-plugin (.ci/setup does)",
)


@PLUGIN
def test_example_plugin_is_registered_by_its_entry_point():
    rows = {r.name: r for r in rf.list_backends()}
    assert rows["example_blockwise"].available and rows["example_blockwise"].priority == -10
    assert rf.get_backend("cpu").name != "example_blockwise"  # never preferred automatically


@PLUGIN
def test_example_plugin_passes_the_kit():
    report = check_backend("example_blockwise", dtypes=[torch.float32, torch.float16, torch.bfloat16],
                           cases=default_cases((64, 128), long=False))
    assert report.passed, report.table()
    assert {r.verdict for r in report.rows if r.dtype == "float16"} == {"refused"}


@PLUGIN
def test_cli_parity_passes_the_plugin(capsys):
    assert main(["parity", "--backend", "example_blockwise", "--quick", "--dtypes", "float32"]) == 0
    assert "-> PASS" in capsys.readouterr().out


def test_cli_parity_fails_a_broken_backend():
    script = textwrap.dedent("""
        import sys
        import rainfusion_core as rf
        from rainfusion_core.backends.torch_backend import masked_attention
        from rainfusion_core.cli import main

        class Off(rf.Backend):
            name, device_types = "off_by_scale", ("cpu",)
            def forward(self, q, k, v, mask, scale):
                return masked_attention(q, k, v, mask, scale * 1.05)

        rf.register_backend(Off())
        sys.exit(main(["parity", "--backend", "off_by_scale", "--quick", "--dtypes", "float32"]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "FAIL" in run.stdout


@needs_cpp
def test_cli_parity_all_on_cpu(capsys):
    assert main(["parity", "--all", "--quick", "--dtypes", "float64"]) == 0
    out = capsys.readouterr().out
    assert "== cpu ==" in out and "== torch ==" in out


def test_cli_info_lists_backends_and_devices():
    run = subprocess.run([sys.executable, "-m", "rainfusion_core", "info"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch" in run.stdout and "cpu" in run.stdout and "devices present: cpu" in run.stdout
    assert "cpu kernel: " in run.stdout  # the instruction set it runs, or why it is not built


def test_cli_bench_prints_progress_and_plots(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    assert main(["bench", "--shape", "1,2,2,8,16,32", "--sparsity", "0.5,0.8", "--repeats", "1",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] sparsity 0.50" in out and "[2/2] sparsity 0.80" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_mask_draws_a_png(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["mask", "--frames", "4", "--height", "16", "--width", "16", "--block-size", "64",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "16x16 blocks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--shape", "1,2,3"], "argument --shape: expected 6 positive integers"),
        (["parity"], "give --backend NAME or --all"),
        (["parity", "--backend", "nope"], "unknown backend 'nope'"),
        (["mask", "--frames", "0", "--height", "8", "--width", "8"], "argument --frames: must be >= 1, got 0"),
    ],
)
def test_cli_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
