"""Run the whole test suite on a machine with an NVIDIA GPU, in parallel, and say how it went in one line.

    python tools/gpu_suite.py                 # every test, on the GPU where a test can use one
    python tools/gpu_suite.py -k triton       # extra arguments go to pytest

CI has no GPU, so this is how a change that touches the GPU path is checked before it lands.
The tests run in ``--workers`` pytest-xdist processes (default: 8, at most the CPU count);
tests that must not share the GPU with others at the same time (large allocations, timing,
CUDA-graph capture of a whole model) carry ``pytest.mark.xdist_group("gpu_heavy")`` and run
one after another in one worker. Each worker gets its own Inductor cache folder
(``tests/conftest.py``), so no two processes compile into the same files, and a share of the
CPU threads (``OMP_NUM_THREADS``, and one Inductor compile thread), so eight workers do not
each start one thread per core.

The last line printed is ``N passed, N failed, N skipped in T s (device)``; the exit status
is non-zero when anything failed or errored, or when no test ran.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def device_name() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU: the GPU-only tests skip"
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def counts(report: Path) -> dict[str, int]:
    """passed / failed / skipped from pytest's JUnit XML (errors count as failed)."""
    total = {"tests": 0, "failed": 0, "skipped": 0}
    for suite in ET.parse(report).getroot().iter("testsuite"):
        total["tests"] += int(suite.get("tests", 0))
        total["failed"] += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        total["skipped"] += int(suite.get("skipped", 0))
    total["passed"] = total["tests"] - total["failed"] - total["skipped"]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="pytest-xdist processes (default: 8, at most the CPU count)")
    args, pytest_args = parser.parse_known_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        import xdist  # noqa: F401
    except ImportError:
        print("gpu_suite: needs pytest-xdist (pip install pytest-xdist)", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        run = subprocess.run([sys.executable, "-m", "pytest", "-n", str(args.workers), "--dist", "loadgroup",
                              "-q", "-rfE", f"--junitxml={report}", "--durations=15", *pytest_args], cwd=ROOT,
                             env=env)
        if not report.exists():
            print(f"gpu suite: pytest wrote no report (exit status {run.returncode})")
            return run.returncode or 1
        n = counts(report)
    seconds = time.perf_counter() - start
    print(f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped in {seconds:.0f} s ({device_name()})")
    if n["failed"] or run.returncode not in (0,) or n["tests"] == 0:
        return run.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
