"""Calibration metrics for verbalised confidence: ECE, Brier, overconfidence gap, SPR and AUROC.

Design decisions:
- A missing confidence (``None``, the response stated none or an unparsable one) scores 0.0 in
  every metric, and counts against ``parse_rate``. Scoring it 0 rather than dropping the sample
  keeps every model evaluated on the same n and penalises format failures instead of rewarding them.
- ECE, equal-width (the default) uses ``n_bins`` bins ``[lo, hi)``; the last bin is closed so 1.0
  lands in it and 0.0 lands in the first. Where a confidence exactly on an edge goes is the edge rule:
  ``exact`` (default) bisects the edges ``i / n_bins``, the nearest doubles to the decimals, so a
  confidence written ``0.3`` lands in the bin starting at 0.3; ``linspace`` bisects the edges
  ``i * (1 / n_bins)`` that ``np.linspace(0, 1, n_bins + 1)`` produces, as the paper's reference code
  does (``np.digitize``), where 0.3, 0.6 and 0.7 sit one bin lower because ``3 * 0.1 > 0.3`` in binary.
  ``exact`` is the default because a stated "0.3" should share a bin with 0.35, not with 0.25; choose
  ``linspace`` to reproduce the paper's numbers bit for bit. With one-decimal confidences and 8 bins the
  two differ by up to 0.0085 ECE.
- ECE, equal-mass: the confidences sorted and cut into ``n_bins`` groups of (nearly) equal count, a
  tie group never split (each sample's bin is ``floor(first rank of its tie group * n_bins / n)``), so the
  result does not depend on the input order. Bins with few distinct confidences (k/K values) may be empty.
  ``calibration_report`` reports the configured scheme as ``ece``; ``caopd compare`` reports both.
- SPR is P(conf of a correct answer > conf of a wrong one) over all (correct, wrong) pairs, ties
  counting 0; AUROC is the same with ties counting 1/2 (the Mann-Whitney AUC). Both are computed by
  one sort plus a sweep over tied groups, O(n log n), with exact integer pair counts; both are
  ``None`` (not NaN, so JSON/logging stay clean) when there is no correct or no wrong answer.
- Pure Python with no numpy/sklearn, so the metrics load anywhere the evaluation runs; n = 100k is
  well under a second.
- Inputs are validated: empty inputs, length mismatches, NaN and out-of-[0, 1] confidences raise
  ``ValueError`` instead of silently producing a number.
- Empty bins report ``accuracy``/``confidence`` as ``None``; they carry no weight in the ECE.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class CalibrationReport:
    """All calibration metrics of one model on one evaluation set."""

    n: int
    accuracy: float
    ece: float
    brier: float
    ocg: float  # overconfidence gap: mean confidence - accuracy (> 0 means overconfident)
    mean_confidence: float
    spr: float | None
    auroc: float | None
    format_adherence: float
    parse_rate: float
    bins: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (bins copied, so callers may mutate it)."""
        return asdict(self)


def _check_inputs(
    correct: Sequence[bool], confidence: Sequence[float | None]
) -> tuple[list[bool], list[float]]:
    """Validate lengths/values; return grades as bools and confidences with None mapped to 0.0."""
    grades = [bool(c) for c in correct]
    if not grades:
        raise ValueError("calibration metrics need at least one sample; got empty inputs")
    if len(confidence) != len(grades):
        raise ValueError(
            f"correct and confidence must have the same length, got {len(grades)} and {len(confidence)}"
        )
    confs: list[float] = []
    for i, c in enumerate(confidence):
        if c is None:
            confs.append(0.0)
            continue
        c = float(c)
        if math.isnan(c) or c < 0.0 or c > 1.0:
            raise ValueError(f"confidence[{i}] = {c} is not a probability in [0, 1]; use None for missing")
        confs.append(c)
    return grades, confs


ECE_BIN_SCHEMES = ("equal_width", "equal_mass")
EDGE_RULES = ("exact", "linspace")


def bin_edges(n_bins: int, edge_rule: str = "exact") -> list[float]:
    """Lower edges of ``n_bins`` equal-width bins: ``i / n`` (exact) or ``i * (1 / n)`` (np.linspace's)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if edge_rule == "exact":
        return [i / n_bins for i in range(n_bins)]
    if edge_rule == "linspace":
        step = 1.0 / n_bins
        return [i * step for i in range(n_bins)]
    raise ValueError(f"edge_rule must be one of {', '.join(EDGE_RULES)}, got {edge_rule!r}")


def _bin_summaries(
    grades: list[bool], confs: list[float], index: list[int], n_bins: int, bounds: list[tuple[float, float]]
) -> list[dict[str, Any]]:
    counts = [0] * n_bins
    hits = [0] * n_bins
    conf_sums = [0.0] * n_bins
    for y, c, b in zip(grades, confs, index):
        counts[b] += 1
        hits[b] += y
        conf_sums[b] += c
    return [
        {
            "lo": bounds[i][0],
            "hi": bounds[i][1],
            "count": counts[i],
            "accuracy": hits[i] / counts[i] if counts[i] else None,
            "confidence": conf_sums[i] / counts[i] if counts[i] else None,
        }
        for i in range(n_bins)
    ]


def reliability_bins(
    correct: Sequence[bool], confidence: Sequence[float | None], n_bins: int = 10, edge_rule: str = "exact"
) -> list[dict[str, Any]]:
    """Per-bin counts, accuracy and mean confidence over equal-width confidence bins.

    Args:
        correct: grades.
        confidence: confidences in [0, 1]; ``None`` counts as 0.0.
        n_bins: number of equal-width bins on [0, 1].
        edge_rule: ``exact`` or ``linspace`` (module docstring).

    Returns:
        One dict per bin: ``lo``, ``hi``, ``count``, ``accuracy`` and ``confidence`` (the last two
        ``None`` for an empty bin).
    """
    edges = bin_edges(n_bins, edge_rule)
    grades, confs = _check_inputs(correct, confidence)
    index = [min(bisect_right(edges, c) - 1, n_bins - 1) for c in confs]  # 1.0 closes the last bin
    bounds = [(i / n_bins, (i + 1) / n_bins) for i in range(n_bins)]
    return _bin_summaries(grades, confs, index, n_bins, bounds)


def equal_mass_bins(
    correct: Sequence[bool], confidence: Sequence[float | None], n_bins: int = 10
) -> list[dict[str, Any]]:
    """Per-bin statistics over ``n_bins`` equal-count bins, ties kept together (module docstring).

    ``lo``/``hi`` are the smallest and largest confidence in the bin (``None`` for an empty bin).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    grades, confs = _check_inputs(correct, confidence)
    n = len(confs)
    order = sorted(range(n), key=confs.__getitem__)
    index = [0] * n
    group_start = 0
    for rank, i in enumerate(order):
        if rank and confs[i] != confs[order[rank - 1]]:
            group_start = rank
        index[i] = group_start * n_bins // n
    bounds: list[tuple[Any, Any]] = [(None, None)] * n_bins
    for i in order:  # ascending confidence: the first member of a bin is its lo, the last its hi
        lo = bounds[index[i]][0]
        bounds[index[i]] = (confs[i] if lo is None else lo, confs[i])
    return _bin_summaries(grades, confs, index, n_bins, bounds)


def _ece_from_bins(bins: list[dict[str, Any]], n: int) -> float:
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


def expected_calibration_error(
    correct: Sequence[bool],
    confidence: Sequence[float | None],
    n_bins: int = 10,
    scheme: str = "equal_width",
    edge_rule: str = "exact",
) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|.

    Args:
        correct: grades.
        confidence: confidences in [0, 1]; ``None`` counts as 0.0.
        n_bins: number of bins.
        scheme: ``equal_width`` or ``equal_mass``.
        edge_rule: for equal-width bins, ``exact`` or ``linspace`` (module docstring).

    Returns:
        The expected calibration error in [0, 1].
    """
    if scheme == "equal_width":
        bins = reliability_bins(correct, confidence, n_bins, edge_rule)
    elif scheme == "equal_mass":
        bins = equal_mass_bins(correct, confidence, n_bins)
    else:
        raise ValueError(f"ECE scheme must be one of {', '.join(ECE_BIN_SCHEMES)}, got {scheme!r}")
    return _ece_from_bins(bins, len(correct))


def brier_score(correct: Sequence[bool], confidence: Sequence[float | None]) -> float:
    """Mean squared error between confidence and the 0/1 grade.

    Args:
        correct: grades.
        confidence: confidences in [0, 1]; ``None`` counts as 0.0.

    Returns:
        The Brier score in [0, 1].
    """
    grades, confs = _check_inputs(correct, confidence)
    return sum((c - y) ** 2 for y, c in zip(grades, confs)) / len(grades)


def overconfidence_gap(correct: Sequence[bool], confidence: Sequence[float | None]) -> float:
    """Mean confidence minus accuracy; positive means overconfident.

    Args:
        correct: grades.
        confidence: confidences in [0, 1]; ``None`` counts as 0.0.

    Returns:
        The gap in [-1, 1].
    """
    grades, confs = _check_inputs(correct, confidence)
    return sum(confs) / len(confs) - sum(grades) / len(grades)


def spr_auroc(
    correct: Sequence[bool], confidence: Sequence[float | None]
) -> tuple[float | None, float | None]:
    """Pairwise ranking quality of the confidences, in O(n log n).

    Over all (correct, wrong) pairs, SPR is the fraction where the correct answer has strictly
    higher confidence (ties count 0) and AUROC the Mann-Whitney AUC (ties count 1/2).

    Args:
        correct: grades.
        confidence: confidences in [0, 1]; ``None`` counts as 0.0.

    Returns:
        ``(spr, auroc)``, both ``None`` when all answers are correct or all are wrong.
    """
    grades, confs = _check_inputs(correct, confidence)
    n_pos = sum(grades)
    n_neg = len(grades) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None, None
    order = sorted(range(len(confs)), key=confs.__getitem__)
    wins = 0  # (correct, wrong) pairs with conf_correct > conf_wrong
    ties = 0
    neg_below = 0  # wrong answers with strictly lower confidence than the current group
    i = 0
    while i < len(order):
        value = confs[order[i]]
        pos_group = neg_group = 0
        while i < len(order) and confs[order[i]] == value:
            if grades[order[i]]:
                pos_group += 1
            else:
                neg_group += 1
            i += 1
        wins += pos_group * neg_below
        ties += pos_group * neg_group
        neg_below += neg_group
    pairs = n_pos * n_neg
    return wins / pairs, (wins + 0.5 * ties) / pairs


def calibration_report(
    correct: Sequence[bool],
    confidence: Sequence[float | None],
    well_formed: Sequence[bool] | None = None,
    n_bins: int = 10,
    ece_bins: str = "equal_width",
    edge_rule: str = "exact",
) -> CalibrationReport:
    """Compute every calibration metric for one model.

    Args:
        correct: grades, one per response.
        confidence: parsed confidences; ``None`` (missing) scores 0.0 and lowers ``parse_rate``.
        well_formed: whether each response follows the required format; defaults to "has a parsed
            confidence".
        n_bins: number of ECE bins.
        ece_bins: which scheme ``ece`` reports (``equal_width`` or ``equal_mass``).
        edge_rule: equal-width edge rule, ``exact`` or ``linspace``; ``bins`` (the diagram) use it too.

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        ValueError: empty inputs, length mismatch, a confidence outside [0, 1], or an unknown scheme.
    """
    if ece_bins not in ECE_BIN_SCHEMES:
        raise ValueError(f"ECE scheme must be one of {', '.join(ECE_BIN_SCHEMES)}, got {ece_bins!r}")
    grades, confs = _check_inputs(correct, confidence)
    n = len(grades)
    parsed = [c is not None for c in confidence]
    if well_formed is None:
        well_formed = parsed
    elif len(well_formed) != n:
        raise ValueError(f"well_formed must have length {n}, got {len(well_formed)}")
    bins = reliability_bins(grades, confs, n_bins, edge_rule)
    ece = _ece_from_bins(bins if ece_bins == "equal_width" else equal_mass_bins(grades, confs, n_bins), n)
    spr, auroc = spr_auroc(grades, confs)
    accuracy = sum(grades) / n
    mean_conf = sum(confs) / n
    return CalibrationReport(
        n=n,
        accuracy=accuracy,
        ece=ece,
        brier=brier_score(grades, confs),
        ocg=mean_conf - accuracy,
        mean_confidence=mean_conf,
        spr=spr,
        auroc=auroc,
        format_adherence=sum(bool(w) for w in well_formed) / n,
        parse_rate=sum(parsed) / n,
        bins=bins,
    )
