"""The GPU benchmark scripts refuse bad arguments and missing hardware in one line, exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "schedules_bench.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_schedules_bench_names_an_unknown_shape():
    run = _run("--shapes", "wan-1.3b,nope")
    assert run.returncode == 2, run.stderr
    assert "--shapes: unknown nope; choose from wan-1.3b" in run.stderr.splitlines()[-1]
    assert "Traceback" not in run.stderr


def test_schedules_bench_needs_at_least_one_round():
    run = _run("--rounds", "0")
    assert run.returncode == 2 and "--rounds: at least 1, got 0" in run.stderr.splitlines()[-1], run.stderr


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0),
                    reason="on a Hopper GPU the script runs")
def test_schedules_bench_says_it_needs_a_hopper_gpu():
    run = _run("--shapes", "cogvideox-5b")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1].endswith("needs an NVIDIA Hopper GPU (sm_90)")
    assert "Traceback" not in run.stderr
