"""The metric definitions the README states: ECE edge rules, equal-mass bins, degenerate SPR/AUROC, missing confidence."""
from __future__ import annotations

import random

import numpy as np
import pytest

from caopd_megatron.evaluation.metrics import (
    bin_edges,
    calibration_report,
    equal_mass_bins,
    expected_calibration_error,
    reliability_bins,
)


def _reference_linspace_ece(correct, conf, n_bins):
    """The paper's rule, written directly in numpy: np.linspace edges, np.digitize, clipped."""
    correct, conf = np.asarray(correct, dtype=float), np.asarray(conf, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    idx = np.clip(np.digitize(conf, edges) - 1, 0, n_bins - 1)
    return sum(np.mean(idx == b) * abs(conf[idx == b].mean() - correct[idx == b].mean())
               for b in range(n_bins) if np.any(idx == b))


def test_edge_rules_place_03_06_07_differently():
    for value, exact_bin in ((0.3, 3), (0.6, 6), (0.7, 7)):
        exact = reliability_bins([True], [value], 10, "exact")
        linspace = reliability_bins([True], [value], 10, "linspace")
        assert exact[exact_bin]["count"] == 1
        assert linspace[exact_bin - 1]["count"] == 1  # one bin lower, as np.linspace + np.digitize put it
    for value in (0.1, 0.2, 0.4, 0.5, 0.8, 0.9):  # these agree under both rules
        assert reliability_bins([True], [value], 10, "exact") == reliability_bins([True], [value], 10, "linspace")
    assert bin_edges(10, "linspace") == list(np.linspace(0, 1, 11)[:-1])
    with pytest.raises(ValueError, match="edge_rule"):
        bin_edges(10, "floor")


@pytest.mark.parametrize("n_bins", [5, 8, 10, 15])
def test_linspace_rule_matches_the_reference_code_on_one_decimal_and_k_over_k_confidences(n_bins):
    rng = random.Random(n_bins)
    conf = [rng.choice([i / 10 for i in range(11)] + [k / 8 for k in range(9)]) for _ in range(500)]
    correct = [rng.random() < c for c in conf]
    ours = expected_calibration_error(correct, conf, n_bins, edge_rule="linspace")
    assert ours == pytest.approx(_reference_linspace_ece(correct, conf, n_bins), abs=1e-12)


def test_edge_rules_differ_by_a_hand_computed_amount():
    # K = 10: 0.3 is alone in bin 3 (exact) or joins 0.25 in bin 2 (linspace).
    correct, conf = [True, False], [0.3, 0.25]
    assert expected_calibration_error(correct, conf, 10, edge_rule="exact") == pytest.approx(0.5 * 0.7 + 0.5 * 0.25)
    assert expected_calibration_error(correct, conf, 10, edge_rule="linspace") == pytest.approx(abs(0.275 - 0.5))


def test_equal_mass_bins_hand_computed_and_against_numpy_array_split():
    conf = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2]
    correct = [True, False, True, False, True, True]
    bins = equal_mass_bins(correct, conf, 3)
    assert [b["count"] for b in bins] == [2, 2, 2]
    assert [(b["lo"], b["hi"]) for b in bins] == [(0.1, 0.2), (0.3, 0.5), (0.7, 0.9)]
    # |0.15 - 0.5|, |0.4 - 0.5|, |0.8 - 1.0|, each weighted 1/3
    assert expected_calibration_error(correct, conf, 3, scheme="equal_mass") == pytest.approx((0.35 + 0.1 + 0.2) / 3)
    rng = np.random.default_rng(0)
    c = rng.random(1000)
    y = rng.random(1000) < c
    order = np.argsort(c)
    direct = sum(len(chunk) / 1000 * abs(c[chunk].mean() - y[chunk].mean()) for chunk in np.array_split(order, 10))
    assert expected_calibration_error(y.tolist(), c.tolist(), 10, scheme="equal_mass") == pytest.approx(direct)


def test_equal_mass_keeps_ties_together_and_ignores_input_order():
    conf = [0.5] * 4 + [0.9] * 2
    correct = [True, False, True, False, True, True]
    bins = equal_mass_bins(correct, conf, 3)
    assert [b["count"] for b in bins] == [4, 0, 2]
    shuffled = list(zip(correct, conf))
    random.Random(1).shuffle(shuffled)
    y2, c2 = zip(*shuffled)
    assert expected_calibration_error(y2, c2, 3, scheme="equal_mass") == expected_calibration_error(
        correct, conf, 3, scheme="equal_mass")


def test_report_ece_follows_the_chosen_scheme():
    correct, conf = [True, False, True, True], [0.9, 0.6, 0.3, 0.8]
    width = calibration_report(correct, conf, n_bins=2)
    mass = calibration_report(correct, conf, n_bins=2, ece_bins="equal_mass")
    assert width.ece == pytest.approx(0.25) == expected_calibration_error(correct, conf, 2, scheme="equal_width")
    assert mass.ece == pytest.approx(0.1) == expected_calibration_error(correct, conf, 2, scheme="equal_mass")
    assert width.ece != mass.ece
    with pytest.raises(ValueError, match="scheme"):
        calibration_report(correct, conf, ece_bins="quantile")


def test_spr_auroc_undefined_when_all_right_or_all_wrong_and_missing_scores_zero():
    assert calibration_report([True, True], [0.2, 0.9]).spr is None
    assert calibration_report([False, False], [0.2, 0.9]).auroc is None
    # A missing confidence counts as 0.0: a right answer with none stated is maximally underconfident.
    report = calibration_report([True, False], [None, 0.0])
    assert report.brier == pytest.approx(0.5) and report.parse_rate == 0.5 and report.auroc == 0.5
