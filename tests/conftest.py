"""Shared pytest set-up: quiet megatron-core's optional-dependency warnings, keep torch to the CI's 2 cores."""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/test_gpu.py; benchmarks/gpu/run.sh runs them)")
