"""Shared pytest set-up: quiet megatron-core's optional-dependency warnings, keep torch to the CI's 2 cores,
and skip ``gpu``-marked tests on machines without CUDA unless CAOPD_GPU_TESTS_ON_CPU=1 (markers are
registered in ``pytest.ini``). ``tiny_demo``: one reduced ``caopd demo`` per session for the tests that only
read its outputs (a process start and a demo cost seconds each on 2 cores)."""
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_cli_e2e import TINY, caopd  # noqa: E402  (needs the line above)
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


@dataclass(frozen=True)
class DemoRun:
    """A finished ``caopd demo``: its output directory (read-only for the tests) and the process's result."""

    out: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> DemoRun:
    """``caopd demo`` at test_cli_e2e's reduced size: TINY, 15 warm-up steps of 32, 3 distillation steps."""
    out = tmp_path_factory.mktemp("tiny_demo") / "demo"
    return DemoRun(out, caopd("demo", *TINY, "warmup.steps=15", "warmup.batch_size=32", "distill.steps=3",
                              f"run.output_dir={out}"))
