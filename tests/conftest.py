"""Shared pytest set-up: quiet megatron-core's optional-dependency warnings, keep torch to the CI's 2 cores,
and skip ``gpu``-marked tests on machines without CUDA unless CAOPD_GPU_TESTS_ON_CPU=1 (markers are
registered in ``pytest.ini``)."""
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
torch.set_num_threads(2)

# Set to 1, the gpu tests run their code paths on the CPU (tests/test_gpu.py; benchmarks/gpu/run.sh --dry-run).
GPU_TESTS_ON_CPU = "CAOPD_GPU_TESTS_ON_CPU"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get(GPU_TESTS_ON_CPU) == "1":
        return
    no_cuda = pytest.mark.skip(reason="needs CUDA (marked gpu); torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


def pytest_report_header(config):
    """Name the megatron-core under test (CI runs the suite against two releases)."""
    try:
        return f"megatron-core {version('megatron-core')}, torch {torch.__version__}"
    except PackageNotFoundError:
        return "megatron-core: not installed"
