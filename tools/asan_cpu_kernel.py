"""Run the C++ CPU kernel under AddressSanitizer.

    python tools/asan_cpu_kernel.py [--quick]

Builds ``csrc/`` with ``-fsanitize=address`` into a temporary folder, then runs,
in a child Python with the sanitizer preloaded and that build in place of the
installed ``rainfusion_core._cpu_kernel``:

* the conformance kit's cases (every dtype) on the ``cpu`` backend, once per
  instruction-set path this CPU runs (AVX-512, AVX2, generic);
* hostile masks: indices and counts edited in place after construction
  (negative, past NK, huge), which the binding must refuse with a
  ``ValueError`` before any thread reads them;
* a block size far larger than the sequence.

Exits 0 when every case passed and the sanitizer reported nothing; any
out-of-bounds read or write makes the sanitizer abort the child, and this
script exits non-zero with its report. Needs g++ (or ``$CXX``) with
``libasan`` and pybind11 (``pip install pybind11``). ``tests/test_memory_safety.py``
runs it with ``--quick``.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r'''
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("rainfusion_core._cpu_kernel", sys.argv[1])
kernel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel)
sys.modules["rainfusion_core._cpu_kernel"] = kernel  # the sanitized build, not the installed one

import rainfusion_core as rf
from rainfusion_core.testing import check_backend, default_cases

import os
quick = sys.argv[2] == "1"
for isa in kernel.available_isas().split(", "):  # every instruction-set path this CPU runs
    os.environ["RAINFUSION_CPU_ISA"] = isa
    report = check_backend("cpu", cases=default_cases(long=not quick))
    print(isa, report.table().splitlines()[-1], flush=True)
    assert report.passed, report.table()
os.environ.pop("RAINFUSION_CPU_ISA")

torch.manual_seed(0)
q = torch.randn(1, 2, 300, 32)
hostile = {
    "negative index": lambda m: m.kv_indices.fill_(-100000),
    "index past NK": lambda m: m.kv_indices.fill_(3),
    "huge index": lambda m: m.kv_indices.fill_(2**31 - 1),
    "count past NK": lambda m: m.kv_counts.fill_(4),
    "negative count": lambda m: m.kv_counts.fill_(-1),
}
for name, edit in hostile.items():
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 3, 3, dtype=torch.bool), block_size=128, q_len=300, kv_len=300)
    edit(mask)
    try:
        rf.block_sparse_attention(q, q, q, mask, backend="cpu")
    except ValueError as exc:
        print(f"refused ({name}): {exc}", flush=True)
    else:
        raise AssertionError(f"the cpu backend ran a mask with {name}")

mask = rf.BlockMask.from_dense(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=2**22, q_len=300, kv_len=300)
out = rf.block_sparse_attention(q, q, q, mask, backend="cpu")
ref = rf.block_sparse_attention(q.double(), q.double(), q.double(), mask, backend="torch")
assert (out.double() - ref).abs().max() < 1e-4, "block size 2**22 gave a wrong answer"
print("block size 2**22 on 300 tokens: ok", flush=True)
print("ASAN-CHECK-DONE", flush=True)
'''


def build(out_dir: Path) -> Path:
    """The extension, every instruction-set copy of the kernel included, built with the sanitizer."""
    import pybind11

    cxx = os.environ.get("CXX", "g++")
    target = out_dir / ("_cpu_kernel" + sysconfig.get_config_var("EXT_SUFFIX"))
    common = [cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-fopenmp", "-fPIC",
              f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    isa = [("kernel_generic.cpp", [], None)]
    if platform.machine().lower() in ("x86_64", "amd64"):
        isa += [("kernel_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"], "RF_HAVE_AVX2"),
                ("kernel_avx512.cpp", ["-mavx512f", "-mfma", "-mf16c"], "RF_HAVE_AVX512")]
    macros = [f"-D{macro}=1" for _, _, macro in isa if macro]
    units = [(s, f) for s, f, _ in isa] + [("block_sparse_attention.cpp", macros), ("bindings.cpp", macros)]
    objects = [str(out_dir / (source + ".o")) for source, _ in units]
    commands = [common + flags + ["-c", str(ROOT / "csrc" / source), "-o", obj]
                for (source, flags), obj in zip(units, objects)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one compiler per core
        list(pool.map(lambda command: subprocess.run(command, check=True), commands))
    subprocess.run([cxx, "-shared", "-fsanitize=address", "-fopenmp", *objects, "-o", str(target)], check=True)
    return target


def missing_runtime() -> str | None:
    """Why the sanitized kernel cannot be built and run here (no compiler, no runtime), or None when it can."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler {cxx!r} found (set CXX)"
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not path or not os.path.isabs(path):
            return f"{cxx} has no {name}: install the compiler's AddressSanitizer runtime"
    return None


def asan_preload() -> str:
    """The sanitizer runtime, and the C++ runtime after it (so exceptions thrown by the kernel are intercepted)."""
    cxx = os.environ.get("CXX", "g++")
    paths = (subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
             for name in ("libasan.so", "libstdc++.so"))
    return " ".join(os.path.realpath(path) for path in paths)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the conformance cases above 4K tokens")
    args = parser.parse_args()
    missing = missing_runtime()
    if missing is not None:
        raise SystemExit(missing)
    preload = asan_preload()
    with tempfile.TemporaryDirectory() as tmp:
        print("building the CPU kernel with -fsanitize=address ...", flush=True)
        library = build(Path(tmp))
        env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
                   OMP_NUM_THREADS="2", RAINFUSION_PROGRESS="0")
        print("running the conformance cases and hostile masks under the sanitizer ...", flush=True)
        child = subprocess.run([sys.executable, "-c", CHILD, str(library), "1" if args.quick else "0"],
                               env=env, capture_output=True, text=True)
    sys.stdout.write(child.stdout)
    if child.returncode != 0 or "ASAN-CHECK-DONE" not in child.stdout:
        sys.stderr.write(child.stderr[-20000:])
        print(f"FAILED: the child exited with status {child.returncode}", file=sys.stderr)
        return 1
    print("AddressSanitizer: no error reported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
