"""Tests that the reliability diagram renders valid PNGs for one and several panels."""
import random

import pytest

from caopd_megatron.evaluation.metrics import calibration_report
from caopd_megatron.evaluation.reliability import plot_reliability

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(seed: int, n: int = 300, over: float = 0.2):
    rng = random.Random(seed)
    correct, conf = [], []
    for _ in range(n):
        t = rng.random()
        correct.append(rng.random() < t)
        conf.append(None if rng.random() < 0.05 else min(1.0, t + over))
    return calibration_report(correct, conf)


def _assert_png(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def test_single_panel(tmp_path):
    path = str(tmp_path / "one.png")
    assert plot_reliability({"base": _report(0)}, path) == path
    _assert_png(path)


def test_three_panels_with_title_and_new_dir(tmp_path):
    path = tmp_path / "sub" / "dir" / "three.png"
    reports = {"base": _report(0, over=0.3), "OPD": _report(1, over=0.4), "CaOPD": _report(2, over=0.0)}
    out = plot_reliability(reports, path, title="MATH-500")
    assert out == str(path)
    _assert_png(out)


def test_empty_bins(tmp_path):
    # Only bins 0 and 9 are populated; the rest are empty and must draw nothing without failing.
    sparse = calibration_report([True, False, True], [1.0, 0.0, 1.0])
    assert sum(1 for b in sparse.bins if b["count"]) == 2
    one_sample = calibration_report([False], [0.55], n_bins=5)
    path = str(tmp_path / "sparse.png")
    plot_reliability({"sparse": sparse, "one sample": one_sample}, path)
    _assert_png(path)


def test_no_reports_raises(tmp_path):
    with pytest.raises(ValueError):
        plot_reliability({}, str(tmp_path / "x.png"))
