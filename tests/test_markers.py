"""The suite's markers: ``slow``, ``slurm`` and ``gpu`` are registered, and ``gpu`` tests skip without CUDA.

Reference: the registered names are read back from pytest's own configuration; the skip hook of
``tests/conftest.py`` is called on stand-in items with CUDA reported absent and present.
"""
from __future__ import annotations

import conftest
import pytest


def test_markers_are_registered(request):
    registered = {line.split(":")[0].strip() for line in request.config.getini("markers")}
    assert {"slow", "slurm", "gpu"} <= registered


class StandInItem:
    def __init__(self, *marks: str) -> None:
        self.keywords = dict.fromkeys(marks, True)
        self.added: list = []

    def add_marker(self, mark) -> None:
        self.added.append(mark)


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_tests_skip_only_without_cuda(monkeypatch, cuda):
    monkeypatch.setattr(conftest.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv(conftest.GPU_TESTS_ON_CPU, raising=False)
    gpu, slow, plain = StandInItem("gpu"), StandInItem("slow"), StandInItem()
    conftest.pytest_collection_modifyitems(None, [gpu, slow, plain])
    assert slow.added == [] and plain.added == []
    if cuda:
        assert gpu.added == []
    else:
        assert [m.name for m in gpu.added] == ["skip"] and "CUDA" in gpu.added[0].kwargs["reason"]


def test_gpu_tests_run_on_cpu_when_asked(monkeypatch):
    monkeypatch.setattr(conftest.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(conftest.GPU_TESTS_ON_CPU, "1")
    gpu = StandInItem("gpu")
    conftest.pytest_collection_modifyitems(None, [gpu])
    assert gpu.added == []
