"""Statistics for comparing models on one prompt set: bootstrap intervals, paired differences, risk-coverage.

Design decisions:
- Input per model: one grade (bool) and one confidence (float, a missing one already scored 0.0, the
  metrics module's rule) per prompt, the prompts in the same order for every model. Nothing here knows about
  models or text, so it is tested against direct numpy computations.
- Point estimates are the metrics module's definitions (``calibration_report``, same bins and edge rule);
  the bootstrap recomputes them vectorised over resamples, ``(B, n)`` index arrays in blocks, so 1,000
  resamples of 10k prompts take seconds: equal-width bins are fixed per prompt, equal-mass bins and the
  rank statistics are recomputed per resample from a sort (ties kept together, as in the metrics module).
- One seeded ``np.random.default_rng(seed)`` draws the resample indices ``rng.integers(0, n, (B, n))`` once,
  in blocks of ``BLOCK`` rows, and every model is scored on the same resamples, so the difference of two
  models' resampled metrics is the PAIRED bootstrap of the difference. Intervals are percentile intervals
  (``np.percentile``, linear interpolation) at ``level``.
- A difference is significant when its interval excludes 0. Resamples where SPR or AUROC is undefined (no
  right or no wrong answer) are left out of that metric's interval and counted (``undefined``).
- Risk-coverage: prompts sorted by confidence, highest first; at coverage k/n the risk is the error rate
  of the k most confident. Within a tie group the order is not defined by the model, so the curve uses the
  expected number of errors under a random order of the tie (errors spread evenly over the group).
  AURC = mean risk over k = 1..n. A threshold gate keeps the prompts with confidence >= t and reports
  coverage (kept share) and selective accuracy (accuracy of the kept, undefined when none is kept).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from caopd_megatron.evaluation.metrics import bin_edges, calibration_report, expected_calibration_error

__all__ = [
    "BLOCK",
    "HIGHER_IS_BETTER",
    "METRICS",
    "ComparisonStats",
    "Interval",
    "aurc",
    "compare_models",
    "metric_matrix",
    "risk_coverage",
]

BLOCK = 200  # resamples per vectorised block
METRICS = ("accuracy", "ece_equal_width", "ece_equal_mass", "brier", "ocg", "abs_ocg", "spr", "auroc",
           "parse_rate", "aurc")
# Direction of "better" for the verdict; OCG is judged by its distance from 0 (abs_ocg).
HIGHER_IS_BETTER = {"accuracy": True, "ece_equal_width": False, "ece_equal_mass": False, "brier": False,
                    "abs_ocg": False, "spr": True, "auroc": True, "parse_rate": True, "aurc": False}


@dataclass
class Interval:
    """A point estimate with a bootstrap percentile interval; ``undefined`` resamples were left out."""

    value: float | None
    low: float | None
    high: float | None
    undefined: int = 0

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass
class ComparisonStats:
    """Everything the report shows, for models in display order."""

    n: int
    names: list[str]
    metrics: dict[str, dict[str, Interval]]  # model -> metric -> interval
    differences: dict[tuple[str, str], dict[str, Interval]]  # (a, b) -> metric -> interval of b - a
    thresholds: dict[str, list[dict[str, object]]]  # model -> one dict per threshold
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (coverage, risk)
    samples: int
    seed: int
    level: float
    settings: dict[str, object] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers


def _tie_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted ascending, ``(first, last)`` position of each entry's tie group, per row. [B, n] each."""
    b, n = sorted_values.shape
    pos = np.broadcast_to(np.arange(n), (b, n))
    new_group = np.ones((b, n), dtype=bool)
    new_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    first = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)
    ends = np.ones((b, n), dtype=bool)
    ends[:, :-1] = new_group[:, 1:]
    last = np.minimum.accumulate(np.where(ends, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    return first, last


def _binned_ece(bins: np.ndarray, y: np.ndarray, c: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE per row from per-entry bin indices. bins/y/c: [B, n]; returns [B]."""
    b, n = y.shape
    flat = (bins + n_bins * np.arange(b)[:, None]).ravel()
    count = np.bincount(flat, minlength=b * n_bins).reshape(b, n_bins)
    hits = np.bincount(flat, weights=y.ravel(), minlength=b * n_bins).reshape(b, n_bins)
    conf = np.bincount(flat, weights=c.ravel(), minlength=b * n_bins).reshape(b, n_bins)
    return np.abs(hits - conf).sum(axis=1) / n  # sum_bins count/n * |acc - conf| = sum |hits - conf_sum| / n


def _rank_metrics(y: np.ndarray, c: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Equal-mass ECE, SPR, AUROC and AURC per row of [B, n] grades and confidences."""
    b, n = y.shape
    order = np.argsort(c, axis=1, kind="stable")
    cs = np.take_along_axis(c, order, axis=1)
    ys = np.take_along_axis(y, order, axis=1)
    first, last = _tie_bounds(cs)
    ece_mass = _binned_ece(first * n_bins // n, ys, cs, n_bins)

    neg = 1.0 - ys
    neg_before = np.concatenate([np.zeros((b, 1)), np.cumsum(neg, axis=1)], axis=1)  # [B, n+1]
    below = np.take_along_axis(neg_before, first, axis=1)  # wrong answers strictly below
    tied = np.take_along_axis(neg_before, last + 1, axis=1) - below  # wrong answers in the same tie group
    n_pos = ys.sum(axis=1)
    pairs = n_pos * (n - n_pos)
    wins = (ys * below).sum(axis=1)
    ties = (ys * tied).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        spr = np.where(pairs > 0, wins / pairs, np.nan)
        auroc = np.where(pairs > 0, (wins + 0.5 * ties) / pairs, np.nan)

    # Risk-coverage, most confident first: reverse the ascending order (tie groups stay contiguous).
    err = neg[:, ::-1]
    first_d = (n - 1 - last)[:, ::-1]
    last_d = (n - 1 - first)[:, ::-1]
    err_before = np.concatenate([np.zeros((b, 1)), np.cumsum(err, axis=1)], axis=1)
    group_err = np.take_along_axis(err_before, last_d + 1, axis=1) - np.take_along_axis(err_before, first_d, axis=1)
    k = np.arange(1, n + 1)
    expected_err = np.take_along_axis(err_before, first_d, axis=1) + (k - first_d) * group_err / (last_d - first_d + 1)
    risk = expected_err / k
    return {"ece_equal_mass": ece_mass, "spr": spr, "auroc": auroc, "aurc": risk.mean(axis=1), "risk": risk}


def metric_matrix(y: np.ndarray, c: np.ndarray, parsed: np.ndarray, n_bins: int, edge_rule: str,
                  with_curve: bool = False) -> dict[str, np.ndarray]:
    """Every metric of ``METRICS`` for each row of [B, n] grades / confidences / parsed flags; values are [B]."""
    y = y.astype(float)
    edges = np.asarray(bin_edges(n_bins, edge_rule))
    bins = np.minimum(np.searchsorted(edges, c, side="right") - 1, n_bins - 1)
    out = _rank_metrics(y, c, n_bins)
    risk = out.pop("risk")
    ocg = c.mean(axis=1) - y.mean(axis=1)
    out.update(accuracy=y.mean(axis=1), ece_equal_width=_binned_ece(bins, y, c, n_bins),
               brier=((c - y) ** 2).mean(axis=1), ocg=ocg, abs_ocg=np.abs(ocg), parse_rate=parsed.mean(axis=1))
    if with_curve:
        out["risk"] = risk
    return out


def risk_coverage(correct: Sequence[bool], confidence: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage k/n, risk at k) for k = 1..n, ties handled by expectation (module docstring)."""
    y = np.asarray(correct, dtype=float)[None]
    c = np.asarray(confidence, dtype=float)[None]
    risk = _rank_metrics(y, c, 1)["risk"][0]
    return np.arange(1, y.shape[1] + 1) / y.shape[1], risk


def aurc(correct: Sequence[bool], confidence: Sequence[float]) -> float:
    """Area under the risk-coverage curve: the mean risk over coverages k/n, k = 1..n."""
    return float(risk_coverage(correct, confidence)[1].mean())


def _interval(values: np.ndarray, point: float | None, level: float) -> Interval:
    finite = values[~np.isnan(values)]
    undefined = int(values.size - finite.size)
    if point is None or finite.size == 0:
        return Interval(point, None, None, undefined)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(point, float(low), float(high), undefined)


def _point_metrics(y: np.ndarray, c: np.ndarray, parsed: np.ndarray, n_bins: int, edge_rule: str) -> dict[str, float | None]:
    confidence = [float(v) if ok else None for v, ok in zip(c, parsed)]
    report = calibration_report(y.tolist(), confidence, n_bins=n_bins, edge_rule=edge_rule)
    ece_mass = expected_calibration_error(y.tolist(), confidence, n_bins, scheme="equal_mass")
    return {
        "accuracy": report.accuracy, "ece_equal_width": report.ece,
        "ece_equal_mass": ece_mass, "brier": report.brier, "ocg": report.ocg,
        "abs_ocg": abs(report.ocg), "spr": report.spr, "auroc": report.auroc, "parse_rate": report.parse_rate,
        "aurc": aurc(y, c),
    }


def _gate(y: np.ndarray, c: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage [B] and selective accuracy [B] (NaN when nothing is kept) of the gate conf >= t."""
    kept = c >= t
    count = kept.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count / c.shape[1], np.where(count > 0, (kept * y).sum(axis=1) / count, np.nan)


# ------------------------------------------------------------------------------------------------ main entry


def compare_models(
    results: Mapping[str, tuple[Sequence[bool], Sequence[float | None]]],
    *,
    n_bins: int = 10,
    edge_rule: str = "exact",
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    thresholds: Sequence[float] = (0.5, 0.8, 0.9),
) -> ComparisonStats:
    """Point estimates, bootstrap intervals and paired differences for models graded on the same prompts.

    Args:
        results: model name -> (grades, confidences), one entry per prompt in the same order for every
            model; a ``None`` confidence is missing (scored 0.0, not parsed).
        samples: bootstrap resamples B (> 0); seed: the numpy generator's seed; level: interval coverage.
        thresholds: confidence gates for the coverage / selective-accuracy table.
    """
    if len(results) < 1:
        raise ValueError("compare_models needs at least one model")
    if samples < 1:
        raise ValueError(f"bootstrap samples must be >= 1, got {samples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    names = list(results)
    sizes = {len(results[m][0]) for m in names} | {len(results[m][1]) for m in names}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every model needs one grade and one confidence per prompt, same n; got sizes {sorted(sizes)}")
    n = sizes.pop()
    ys = {m: np.asarray([bool(v) for v in results[m][0]], dtype=float) for m in names}
    parsed = {m: np.asarray([v is not None for v in results[m][1]]) for m in names}
    cs = {m: np.asarray([0.0 if v is None else float(v) for v in results[m][1]]) for m in names}

    points = {m: _point_metrics(ys[m], cs[m], parsed[m], n_bins, edge_rule) for m in names}
    gates = {m: [_gate(ys[m][None], cs[m][None], t) for t in thresholds] for m in names}

    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in METRICS} for m in names}
    gate_draws: dict[str, list[tuple[list[np.ndarray], list[np.ndarray]]]] = {
        m: [([], []) for _ in thresholds] for m in names}
    for start in range(0, samples, BLOCK):
        idx = rng.integers(0, n, size=(min(BLOCK, samples - start), n))
        for m in names:
            values = metric_matrix(ys[m][idx], cs[m][idx], parsed[m][idx], n_bins, edge_rule)
            for k in METRICS:
                draws[m][k].append(values[k])
            for j, t in enumerate(thresholds):
                cov, acc = _gate(ys[m][idx], cs[m][idx], t)
                gate_draws[m][j][0].append(cov)
                gate_draws[m][j][1].append(acc)
    stacked = {m: {k: np.concatenate(draws[m][k]) for k in METRICS} for m in names}

    metrics = {m: {k: _interval(stacked[m][k], points[m][k], level) for k in METRICS} for m in names}
    differences: dict[tuple[str, str], dict[str, Interval]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            differences[(a, b)] = {
                k: _interval(stacked[b][k] - stacked[a][k],
                             None if points[a][k] is None or points[b][k] is None else points[b][k] - points[a][k],
                             level)
                for k in METRICS
            }
    threshold_rows: dict[str, list[dict[str, object]]] = {}
    for m in names:
        rows = []
        for j, t in enumerate(thresholds):
            cov, acc = gates[m][j]
            acc_point = None if np.isnan(acc[0]) else float(acc[0])
            rows.append({
                "threshold": float(t),
                "coverage": _interval(np.concatenate(gate_draws[m][j][0]), float(cov[0]), level),
                "selective_accuracy": _interval(np.concatenate(gate_draws[m][j][1]), acc_point, level),
                "kept": int(round(float(cov[0]) * n)),
            })
        threshold_rows[m] = rows
    curves = {m: risk_coverage(ys[m], cs[m]) for m in names}
    return ComparisonStats(n=n, names=names, metrics=metrics, differences=differences, thresholds=threshold_rows,
                           curves=curves, samples=samples, seed=seed, level=level,
                           settings={"n_bins": n_bins, "edge_rule": edge_rule, "thresholds": list(thresholds)})
