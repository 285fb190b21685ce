"""Optional experiment tracking: asking for wandb without it is a clear start-up error; off means no import."""
import sys

import pytest

from caopd_megatron.runtime.backend import BackendError
from caopd_megatron.runtime.progress import ExperimentTracker


def test_wandb_requested_but_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(BackendError, match="needs the wandb package"):
        ExperimentTracker(True, tmp_path, {})


def test_wandb_off_never_imports(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    tracker = ExperimentTracker(False, tmp_path, {})
    tracker.log(0, {"loss": 1.0})
    assert tracker.run is None
