"""Tests for the calibration metrics, with hand-computed values and a brute-force SPR/AUROC reference."""
import json
import random
import time

import pytest

from caopd_megatron.evaluation.metrics import (
    CalibrationReport,
    brier_score,
    calibration_report,
    expected_calibration_error,
    overconfidence_gap,
    reliability_bins,
    spr_auroc,
)


def _bin_of(conf: float, n_bins: int = 10) -> int:
    bins = reliability_bins([True], [conf], n_bins)
    return next(i for i, b in enumerate(bins) if b["count"])


# ---------------------------------------------------------------- bins / ECE
@pytest.mark.parametrize(
    "conf, expected_bin",
    [(0.0, 0), (0.05, 0), (0.0999, 0), (0.1, 1), (0.2, 2), (0.3, 3), (0.5, 5), (0.7, 7),
     (0.9, 9), (0.95, 9), (1.0, 9)],
)
def test_bin_edges(conf, expected_bin):
    assert _bin_of(conf) == expected_bin


def test_bin_edges_other_bin_counts():
    # With 3 bins the edges are 0, 1/3, 2/3; exactly 1/3 and 2/3 open bins 1 and 2.
    assert [_bin_of(c, 3) for c in (0.0, 1 / 3, 0.5, 2 / 3, 1.0)] == [0, 1, 1, 2, 2]
    assert [_bin_of(c, 1) for c in (0.0, 0.5, 1.0)] == [0, 0, 0]


def test_ece_hand_computed():
    correct = [True, False, True, True, False]
    conf = [0.95, 0.95, 0.15, 0.1, 0.55]
    # bin 9: {0.95 ok, 0.95 wrong}: acc 0.5, conf 0.95 -> |0.5 - 0.95| = 0.45, weight 2/5
    # bin 1: {0.15 ok, 0.1 ok}:     acc 1.0, conf 0.125 -> 0.875,            weight 2/5
    # bin 5: {0.55 wrong}:          acc 0.0, conf 0.55 -> 0.55,              weight 1/5
    # ECE = 0.4*0.45 + 0.4*0.875 + 0.2*0.55 = 0.18 + 0.35 + 0.11 = 0.64
    assert expected_calibration_error(correct, conf) == pytest.approx(0.64)
    bins = reliability_bins(correct, conf)
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 1, 0, 0, 0, 2]
    assert bins[1]["accuracy"] == 1.0 and bins[1]["confidence"] == pytest.approx(0.125)
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    assert bins[3]["lo"] == pytest.approx(0.3) and bins[3]["hi"] == pytest.approx(0.4)


def test_ece_perfect_and_worst():
    # Every bin's accuracy equals its mean confidence: 0.5 conf with 1 of 2 correct, 1.0 with 1/1.
    assert expected_calibration_error([True, False, True], [0.5, 0.5, 1.0]) == pytest.approx(0.0)
    # Confident and wrong / unconfident and right: each bin off by 1.
    assert expected_calibration_error([False, True], [1.0, 0.0]) == pytest.approx(1.0)


def test_ece_none_scores_zero():
    # None -> 0.0 in bin 0 with the correct answer: |1 - 0| = 1, weight 1/2; bin 9: |0 - 1.0| = 1, weight 1/2.
    assert expected_calibration_error([True, False], [None, 1.0]) == pytest.approx(1.0)


# ---------------------------------------------------------------- Brier / OCG
def test_brier_hand_computed():
    # (0.9-1)^2 + (0.8-0)^2 + (0.5-1)^2 + (0-0)^2 = 0.01 + 0.64 + 0.25 + 0 = 0.90; / 4 = 0.225
    assert brier_score([True, False, True, False], [0.9, 0.8, 0.5, 0.0]) == pytest.approx(0.225)
    # None -> 0: (0-1)^2 + (1-1)^2 = 1; / 2 = 0.5
    assert brier_score([True, True], [None, 1.0]) == pytest.approx(0.5)


def test_overconfidence_gap_hand_computed():
    # mean conf = (0.9 + 0.8 + 0.5 + 0.0) / 4 = 0.55; accuracy = 2/4 = 0.5; gap = +0.05
    assert overconfidence_gap([True, False, True, False], [0.9, 0.8, 0.5, 0.0]) == pytest.approx(0.05)
    # underconfident: mean conf 0.2 (None -> 0), accuracy 1.0 -> -0.8
    assert overconfidence_gap([True, True], [0.4, None]) == pytest.approx(-0.8)


# ---------------------------------------------------------------- SPR / AUROC
def test_spr_auroc_hand_computed_with_ties():
    correct = [True, True, False, False, True]
    conf = [0.9, 0.5, 0.5, 0.2, 0.1]
    # pairs (correct conf, wrong conf): 3 correct x 2 wrong = 6
    # 0.9 vs 0.5 win, 0.9 vs 0.2 win, 0.5 vs 0.5 tie, 0.5 vs 0.2 win, 0.1 vs 0.5 loss, 0.1 vs 0.2 loss
    # SPR = 3/6 = 0.5; AUROC = (3 + 0.5*1)/6 = 3.5/6
    spr, auroc = spr_auroc(correct, conf)
    assert spr == pytest.approx(0.5)
    assert auroc == pytest.approx(3.5 / 6)


def test_spr_auroc_all_tied():
    # all pairs tie: SPR 0, AUROC 0.5
    assert spr_auroc([True, False, True, False], [0.7] * 4) == (0.0, 0.5)


def test_spr_auroc_perfect_and_reversed():
    assert spr_auroc([True, False], [0.9, 0.1]) == (1.0, 1.0)
    assert spr_auroc([True, False], [0.1, 0.9]) == (0.0, 0.0)
    # None scores 0, so a correct answer without confidence loses to a wrong one at 0.3
    assert spr_auroc([True, False], [None, 0.3]) == (0.0, 0.0)
    # ... and ties with a wrong one at 0.0
    assert spr_auroc([True, False], [None, 0.0]) == (0.0, 0.5)


@pytest.mark.parametrize("correct", [[True, True], [False, False, False]])
def test_spr_auroc_none_when_one_class(correct):
    assert spr_auroc(correct, [0.5] * len(correct)) == (None, None)


def _brute_force(correct, conf):
    wins = ties = pairs = 0
    for yi, ci in zip(correct, conf):
        if not yi:
            continue
        for yj, cj in zip(correct, conf):
            if yj:
                continue
            pairs += 1
            wins += ci > cj
            ties += ci == cj
    return wins / pairs, (wins + 0.5 * ties) / pairs


@pytest.mark.parametrize("seed", range(6))
def test_spr_auroc_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 150)
    correct = [rng.random() < 0.6 for _ in range(n)]
    correct[0], correct[1] = True, False  # both classes present
    grid = rng.choice([4, 8, 10, None])  # coarse grids force many ties
    conf = [round(rng.random() * grid) / grid if grid else rng.random() for _ in range(n)]
    spr, auroc = spr_auroc(correct, conf)
    ref_spr, ref_auroc = _brute_force(correct, conf)
    assert spr == pytest.approx(ref_spr, abs=1e-12)
    assert auroc == pytest.approx(ref_auroc, abs=1e-12)


def test_spr_auroc_scales_to_100k():
    rng = random.Random(0)
    n = 100_000
    correct = [rng.random() < 0.5 for _ in range(n)]
    conf = [round(rng.random() * 16) / 16 for _ in range(n)]
    start = time.perf_counter()
    spr, auroc = spr_auroc(correct, conf)
    assert time.perf_counter() - start < 5.0  # O(n^2) would take hours
    assert 0.0 <= spr <= auroc <= 1.0
    assert auroc == pytest.approx(0.5, abs=0.02)  # confidence independent of correctness


# ---------------------------------------------------------------- report
def test_calibration_report_hand_computed():
    correct = [True, False, True, False]
    conf = [0.9, 0.8, None, 0.0]
    well_formed = [True, True, False, True]
    r = calibration_report(correct, conf, well_formed)
    assert isinstance(r, CalibrationReport)
    assert r.n == 4
    assert r.accuracy == 0.5
    # None -> 0: mean conf = (0.9 + 0.8 + 0 + 0) / 4 = 0.425
    assert r.mean_confidence == pytest.approx(0.425)
    assert r.ocg == pytest.approx(-0.075)
    # Brier = (0.01 + 0.64 + 1 + 0) / 4 = 0.4125
    assert r.brier == pytest.approx(0.4125)
    # bins: bin 0 {0 ok, 0 wrong}: acc 0.5, conf 0 -> 0.5 * 2/4;
    #       bin 8 {0.8 wrong}: 0.8 * 1/4; bin 9 {0.9 ok}: 0.1 * 1/4  -> 0.25 + 0.2 + 0.025 = 0.475
    assert r.ece == pytest.approx(0.475)
    # pairs: 0.9 beats 0.8 and 0.0 (2 wins); None(0) vs 0.8 loses, vs 0.0 ties -> SPR 2/4, AUROC 2.5/4
    assert r.spr == pytest.approx(0.5)
    assert r.auroc == pytest.approx(0.625)
    assert r.parse_rate == 0.75
    assert r.format_adherence == 0.75
    assert len(r.bins) == 10


def test_calibration_report_defaults_and_to_dict():
    r = calibration_report([True, True], [0.5, None], n_bins=5)
    assert r.format_adherence == r.parse_rate == 0.5  # default well_formed = parsed
    assert r.spr is None and r.auroc is None
    d = r.to_dict()
    assert d["spr"] is None and len(d["bins"]) == 5
    json.dumps(d)  # serialisable, no NaN
    d["bins"][0]["count"] = -1
    assert r.bins[0]["count"] != -1


def test_calibration_report_well_formed_independent_of_parse():
    r = calibration_report([True, False], [0.5, 0.5], well_formed=[False, True])
    assert r.parse_rate == 1.0 and r.format_adherence == 0.5


@pytest.mark.parametrize(
    "call",
    [
        lambda: calibration_report([], []),
        lambda: expected_calibration_error([], []),
        lambda: brier_score([], []),
        lambda: overconfidence_gap([], []),
        lambda: spr_auroc([], []),
        lambda: calibration_report([True], [0.5, 0.5]),
        lambda: calibration_report([True], [0.5], well_formed=[True, False]),
        lambda: calibration_report([True], [1.5]),
        lambda: calibration_report([True], [-0.1]),
        lambda: calibration_report([True], [float("nan")]),
        lambda: calibration_report([True], [0.5], n_bins=0),
    ],
)
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_empty_error_message_is_clear():
    with pytest.raises(ValueError, match="at least one sample"):
        calibration_report([], [])
