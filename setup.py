"""Install rainfusion_core.

* The top-level ``backends/`` folder installs as ``rainfusion_core.backends`` (its
  subpackages, such as ``backends/triton/``, as ``rainfusion_core.backends.triton``).
* The C++ CPU kernel (``csrc/``) builds as ``rainfusion_core._cpu_kernel`` when
  pybind11 and a C++17 compiler are present. Its inner loops are compiled once per
  instruction set (AVX-512, AVX2, generic) and the CPU picks one at run time, so
  the build is portable (no ``-march=native``); OpenMP is probed, not assumed. A
  failed build only warns: the package still installs and the ``cpu`` backend
  reports why it is unavailable.
"""
import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension, has_flag
except ImportError:  # no pybind11: install without the extension
    Pybind11Extension = None


#: The kernel's instruction-set copies: (source, extra flags, macro telling the dispatcher it exists).
#: Each is compiled on its own with its own flags; the CPU picks one at run time, so one build
#: serves every x86-64 CPU (and the generic copy every other CPU).
ISA_SOURCES = [
    ("csrc/kernel_generic.cpp", [], None),
    ("csrc/kernel_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"], "RF_HAVE_AVX2"),
    ("csrc/kernel_avx512.cpp", ["-mavx512f", "-mfma", "-mf16c"], "RF_HAVE_AVX512"),
]


class OptionalBuildExt(build_ext):
    """Build the CPU kernel with the flags this compiler accepts; never fail the install."""

    def build_extensions(self):
        for ext in self.extensions:
            for flag in ("-O3", "-fopenmp"):
                if has_flag(self.compiler, flag):
                    ext.extra_compile_args.append(flag)
                    if flag == "-fopenmp":
                        ext.extra_link_args.append(flag)
        try:
            for ext in self.extensions:
                self._build_isa_objects(ext)
            super().build_extensions()
        except Exception as exc:  # compiler missing or broken: the cpu backend says so at run time
            print(f"WARNING: rainfusion_core C++ CPU kernel not built ({exc}); "
                  "the 'cpu' backend will be unavailable", file=sys.stderr)

    def _build_isa_objects(self, ext):
        """Compile each instruction-set copy with its flags and link the objects into ``ext``."""
        is_x86 = platform.machine().lower() in ("x86_64", "amd64", "x86", "i686")
        common = ["-std=c++17", *ext.extra_compile_args]
        for source, flags, macro in ISA_SOURCES:
            if flags and not (is_x86 and all(has_flag(self.compiler, f) for f in flags)):
                continue  # this compiler or machine cannot build that copy: the dispatcher leaves it out
            objects = self.compiler.compile([source], output_dir=self.build_temp, include_dirs=["csrc"],
                                            extra_postargs=common + flags)
            ext.extra_objects.extend(objects)
            if macro:
                ext.define_macros.append((macro, "1"))

ext_modules, cmdclass = [], {}
if Pybind11Extension is not None and os.environ.get("RAINFUSION_SKIP_CPP") != "1":
    ext_modules = [
        Pybind11Extension(
            "rainfusion_core._cpu_kernel",
            ["csrc/block_sparse_attention.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
        )
    ]
    cmdclass = {"build_ext": OptionalBuildExt}

setup(
    name="rainfusion_core",
    version="0.1.0",
    description="Hardware-portable RainFusion2.0 block-sparse attention for video diffusion transformers",
    python_requires=">=3.9",
    packages=["rainfusion_core", "rainfusion_core.backends", "rainfusion_core.backends.triton",
              "rainfusion_core.backends.triton.hopper", "rainfusion_core.integrations",
              "rainfusion_core.integrations.diffusers"],
    package_dir={"rainfusion_core": "rainfusion_core", "rainfusion_core.backends": "backends"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.5", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist", "matplotlib", "triton>=3.0", "diffusers>=0.33", "pybind11>=2.10"],
        "diffusers": ["diffusers>=0.33", "transformers"],
        "triton": ["triton>=3.0"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["rainfusion = rainfusion_core.cli:main"]},
)
