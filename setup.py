"""Install rainfusion_core; the top-level ``backends/`` folder installs as ``rainfusion_core.backends``."""
from setuptools import setup

setup(
    name="rainfusion_core",
    version="0.1.0",
    description="Hardware-portable RainFusion2.0 block-sparse attention for video diffusion transformers",
    python_requires=">=3.9",
    packages=["rainfusion_core", "rainfusion_core.backends"],
    package_dir={"rainfusion_core": "rainfusion_core", "rainfusion_core.backends": "backends"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"test": ["pytest>=7"], "triton": ["triton>=3.0"]},
)
