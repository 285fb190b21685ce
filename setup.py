"""caopd_megatron: calibration-aware on-policy distillation (CaOPD) on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="caopd_megatron",
    version="0.1.0",
    description="Calibration-aware on-policy distillation for LLMs on megatron-core",
    packages=find_packages(include=["caopd_megatron", "caopd_megatron.*"]),
    # Presets are data shipped in the package (`caopd demo` loads config/presets/demo.yaml).
    package_data={"caopd_megatron.config": ["presets/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the Makefile for CPU installs (2.13.0 has a local CPU wheel); any >= 2.4 works on GPU.
        "torch>=2.4",
        # Tested: 0.16.1 (the last release for Python 3.11; the whole suite) and the newest release, 0.19.2
        # (CI's second job: the suite without the slow multi-process tests). Releases after 0.19 are untested.
        "megatron-core>=0.16.1,<0.20",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "pyyaml>=6",
        # megatron-core's distributed-checkpoint writer (torch_dist) needs it; megatron-core does not declare it.
        "psutil>=5.9",
    ],
    extras_require={
        "test": ["pytest>=7", "import-linter>=2.1"],
        "parquet": ["pyarrow>=14"],
        # benchmarks/bench_onpolicy_trl.py's comparison side (run in its own environment; never imported by the package)
        "bench": ["trl>=1.16"],
        # GPU accelerations (optional): install Transformer Engine / NVIDIA apex from NVIDIA's instructions.
    },
    entry_points={"console_scripts": ["caopd=caopd_megatron.cli.main:main"]},
)
