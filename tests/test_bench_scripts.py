"""The Hopper benchmark scripts refuse bad arguments and missing hardware in one line, exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _run(script, *args):
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", ["schedules_bench.py", "peers_bench.py"])
def test_an_unknown_shape_is_named(script):
    run = _run(script, "--shapes", "wan-1.3b,nope")
    assert run.returncode == 2, run.stderr
    assert "--shapes: unknown nope; choose from wan-1.3b" in run.stderr.splitlines()[-1]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("script", ["schedules_bench.py", "peers_bench.py"])
def test_rounds_must_be_at_least_one(script):
    run = _run(script, "--rounds", "0")
    assert run.returncode == 2 and "--rounds: at least 1, got 0" in run.stderr.splitlines()[-1], run.stderr


@pytest.mark.skipif(ON_HOPPER, reason="on a Hopper GPU the scripts run")
@pytest.mark.parametrize("script", ["schedules_bench.py", "peers_bench.py"])
def test_without_a_hopper_gpu_the_script_says_so(script):
    run = _run(script, "--shapes", "cogvideox-5b")
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1].endswith("needs an NVIDIA Hopper GPU (sm_90)")
    assert "Traceback" not in run.stderr
