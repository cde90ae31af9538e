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


@pytest.mark.parametrize("script", ["schedules_bench.py", "peers_bench.py", "tile_cost_bench.py"])
def test_an_unknown_shape_is_named(script):
    run = _run(script, "--shapes", "wan-1.3b,nope")
    assert run.returncode == 2, run.stderr
    assert "--shapes: unknown nope; choose from wan-1.3b" in run.stderr.splitlines()[-1]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("script", ["schedules_bench.py", "peers_bench.py", "tile_cost_bench.py"])
def test_rounds_must_be_at_least_one(script):
    run = _run(script, "--rounds", "0")
    assert run.returncode == 2 and "--rounds: at least 1, got 0" in run.stderr.splitlines()[-1], run.stderr


def test_the_profile_script_names_a_bad_argument_in_one_line():
    run = _run("hopper_profile.py", "--launches", "0")
    assert run.returncode == 2 and "--launches: at least 1, got 0" in run.stderr.splitlines()[-1], run.stderr
    run = _run("hopper_profile.py", "--precision", "fp4")
    assert run.returncode == 2 and "argument --precision: invalid choice: 'fp4'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(ON_HOPPER, reason="on a Hopper GPU the scripts run")
@pytest.mark.parametrize("script, args", [("schedules_bench.py", ["--shapes", "cogvideox-5b"]),
                                          ("peers_bench.py", ["--shapes", "cogvideox-5b"]),
                                          ("tile_cost_bench.py", ["--shapes", "cogvideox-5b"]),
                                          ("hopper_profile.py", ["--shape", "cogvideox-5b"])])
def test_without_a_hopper_gpu_the_script_says_so(script, args):
    run = _run(script, *args)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1].endswith("needs an NVIDIA Hopper GPU (sm_90)")
    assert "Traceback" not in run.stderr


def test_the_kernel_benchmarks_pass_16bit_operands_as_they_are_and_name_a_bad_precision():
    # benchmarking.hopper_kernel_operands; tests/test_ws_kernel.py checks it against what the call passes
    pytest.importorskip("triton.experimental.gluon")
    from helpers import triton_device
    from rainfusion_core.benchmarking import hopper_kernel_operands

    k, v = (torch.randn(1, 2, 200, 64, device=triton_device(), dtype=torch.float16) for _ in range(2))
    k_op, v_op, extra = hopper_kernel_operands(k, v, "bf16")
    assert extra == {} and k_op is k and v_op is v
    with pytest.raises(ValueError, match="precision must be one of \\('bf16', 'fp8'\\), got 'fp16'"):
        hopper_kernel_operands(k, v, "fp16")
