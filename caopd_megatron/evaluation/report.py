"""The comparison report: a Markdown page, a JSON twin, a risk-coverage figure and side-by-side reliability diagrams.

Design decisions:
- Everything printed comes from ``ComparisonStats`` (intervals, paired differences, gates) and from the
  per-prompt rows (breakdowns); the report computes nothing statistical itself beyond per-group point
  estimates with the metrics module.
- The verdict names, for each pair of models, the differences whose paired interval excludes 0, with the
  direction in words ("lower ECE"); the rest are called not significant. OCG is judged by its distance from
  0. It is one paragraph so it can be pasted into a release note.
- Figures use matplotlib's object API (no pyplot state, Agg only), like ``reliability``.
- Breakdowns group prompts by task family and by difficulty (``meta["difficulty"]``, else ``meta["level"]``,
  else ``meta["n_digits"]``); prompts without one are grouped under "-".
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from caopd_megatron.evaluation.compare import HIGHER_IS_BETTER, METRICS, ComparisonStats, Interval
from caopd_megatron.evaluation.metrics import calibration_report
from caopd_megatron.evaluation.reliability import plot_reliability

__all__ = ["DIFFICULTY_KEYS", "difficulty_of", "verdict", "write_report"]

DIFFICULTY_KEYS = ("difficulty", "level", "n_digits")
LABELS = {"accuracy": "accuracy", "ece_equal_width": "ECE (equal-width)", "ece_equal_mass": "ECE (equal-mass)",
          "brier": "Brier", "ocg": "OCG", "abs_ocg": "|OCG|", "spr": "SPR", "auroc": "AUROC",
          "parse_rate": "parse rate", "aurc": "AURC"}
TABLE_METRICS = tuple(m for m in METRICS if m != "abs_ocg")


def difficulty_of(meta: Mapping[str, Any]) -> str:
    for key in DIFFICULTY_KEYS:
        if key in meta and meta[key] is not None:
            return str(meta[key])
    return "-"



def _cell(iv: Interval, signed: bool = False) -> str:
    if iv.value is None:
        return "n/a"
    value = f"{iv.value:+.3f}" if signed else f"{iv.value:.3f}"
    if iv.low is None:
        return value
    low, high = (f"{iv.low:+.3f}", f"{iv.high:+.3f}") if signed else (f"{iv.low:.3f}", f"{iv.high:.3f}")
    undefined = f" ({iv.undefined} resamples undefined)" if iv.undefined else ""
    return f"{value} [{low}, {high}]{undefined}"


def verdict(stats: ComparisonStats) -> str:
    """One paragraph naming the significant paired differences (interval excludes 0) for every pair."""
    pct = round(stats.level * 100)
    sentences = []
    for (a, b), diffs in stats.differences.items():
        better, worse, unclear = [], [], []
        for metric, higher in HIGHER_IS_BETTER.items():
            iv = diffs[metric]
            label = LABELS[metric]
            if iv.value is None or not iv.excludes_zero:
                unclear.append(label)
                continue
            improved = (iv.value > 0) == higher
            (better if improved else worse).append(f"{label} {iv.value:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]")
        parts = []
        if better:
            parts.append(f"{b} is significantly better than {a} on " + "; ".join(better))
        if worse:
            parts.append(("and " if better else f"{b} is ") + "significantly worse on " + "; ".join(worse))
        if not better and not worse:
            parts.append(f"no difference between {b} and {a} is significant")
        sentence = ", ".join(parts)
        if unclear and (better or worse):
            sentence += f"; not significant: {', '.join(unclear)}"
        sentences.append(sentence + ".")
    head = (f"Verdict ({stats.n} prompts, paired bootstrap, {stats.samples} resamples, {pct}% intervals, "
            f"a difference is significant when its interval excludes 0; differences are second minus first): ")
    return head + " ".join(sentences)


def _groups(rows: Sequence[Mapping[str, Any]], key) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(key(r), []).append(i)
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


def _breakdown(rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]], key, title: str, n_bins: int,
               edge_rule: str) -> list[str]:
    first = next(iter(rows_by_model.values()))
    groups = _groups(first, key)
    lines = [f"### By {title}", "", "| " + title + " | n | " + " | ".join(
        f"{m} acc | {m} ECE | {m} conf" for m in rows_by_model) + " |",
             "|---|---|" + "---|---|---|" * len(rows_by_model)]
    for group, idx in groups.items():
        cells = []
        for rows in rows_by_model.values():
            r = calibration_report([rows[i]["correct"] for i in idx], [rows[i]["confidence"] for i in idx],
                                   n_bins=n_bins, edge_rule=edge_rule)
            cells.append(f"{r.accuracy:.3f} | {r.ece:.3f} | {r.mean_confidence:.3f}")
        lines.append(f"| {group} | {len(idx)} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_risk_coverage(stats: ComparisonStats, path: Path) -> Path:
    fig = Figure(figsize=(6.2, 4.4), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in stats.names:
        coverage, risk = stats.curves[name]
        ax.plot(coverage, risk, label=f"{name} (AURC {stats.metrics[name]['aurc'].value:.3f})", linewidth=1.6)
        color = ax.lines[-1].get_color()
        points: dict[tuple[float, float], list[str]] = {}  # gates that keep the same answers share one label
        for row in stats.thresholds[name]:
            cov, acc = row["coverage"].value, row["selective_accuracy"].value
            if acc is not None and cov:
                points.setdefault((cov, 1 - acc), []).append(f"{row['threshold']:g}")
        for (cov, risk), labels in points.items():
            ax.plot(cov, risk, marker="o", markersize=4, color=color)
            ax.annotate("≥" + "/".join(labels), (cov, risk), xytext=(3, 3), textcoords="offset points", fontsize=7,
                        color=color)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share answered, most confident first)")
    ax.set_ylabel("risk (error rate of the answered)")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Risk-coverage (dots: confidence gates)", fontsize=10)
    fig.savefig(path, format="png")
    return path


def write_report(stats: ComparisonStats, rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path,
                 title: str = "Model comparison", sources: Mapping[str, str] | None = None) -> Path:
    """Write ``report.md``, ``report.json``, ``risk_coverage.png`` and ``reliability.png``; returns the .md path.

    ``rows_by_model``: per model, one dict per prompt (same order) with ``correct``, ``confidence`` (None if
    missing), ``task`` and ``meta``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_bins, edge_rule = int(stats.settings["n_bins"]), str(stats.settings["edge_rule"])
    reports = {m: calibration_report([r["correct"] for r in rows], [r["confidence"] for r in rows],
                                     n_bins=n_bins, edge_rule=edge_rule) for m, rows in rows_by_model.items()}
    plot_reliability(reports, str(out / "reliability.png"), title=f"{title}: {stats.n} prompts")
    plot_risk_coverage(stats, out / "risk_coverage.png")

    pct = round(stats.level * 100)
    lines = [f"# {title}", "", verdict(stats), ""]
    if sources:
        lines += ["Models: " + "; ".join(f"**{m}** = `{p}`" for m, p in sources.items()), ""]
    lines += [f"## Metrics ({pct}% bootstrap intervals, {stats.samples} resamples, seed {stats.seed})", "",
              "| model | " + " | ".join(LABELS[k] for k in TABLE_METRICS) + " |",
              "|---|" + "---|" * len(TABLE_METRICS)]
    for m in stats.names:
        lines.append(f"| {m} | " + " | ".join(_cell(stats.metrics[m][k]) for k in TABLE_METRICS) + " |")
    lines += ["", f"ECE with {n_bins} bins, edge rule `{edge_rule}`; a missing confidence scores 0.0. "
              "SPR/AUROC are n/a when every answer is right or every answer is wrong.", ""]
    statuses = {m: Counter(r.get("confidence_status", "-") for r in rows) for m, rows in rows_by_model.items()}
    if any(set(c) - {"-"} for c in statuses.values()):
        lines += ["Stated confidences: " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for m, c in statuses.items()), ""]
    if stats.differences:
        lines += ["## Paired differences (second minus first; * = interval excludes 0)", "",
                  "| pair | " + " | ".join(LABELS[k] for k in TABLE_METRICS) + " |",
                  "|---|" + "---|" * len(TABLE_METRICS)]
        for (a, b), diffs in stats.differences.items():
            cells = [_cell(diffs[k], signed=True) + (" *" if diffs[k].excludes_zero else "") for k in TABLE_METRICS]
            lines.append(f"| {b} − {a} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Confidence gates", "",
              "What a gate `confidence >= t` keeps (coverage) and how often the kept answers are right.", "",
              "| model | threshold | kept | coverage | selective accuracy |", "|---|---|---|---|---|"]
    for m in stats.names:
        for row in stats.thresholds[m]:
            lines.append(f"| {m} | {row['threshold']:g} | {row['kept']} | {_cell(row['coverage'])} | "
                         f"{_cell(row['selective_accuracy'])} |")
    lines += ["", "## Figures", "", "![risk-coverage](risk_coverage.png)", "", "![reliability](reliability.png)", "",
              "## Breakdown", ""]
    lines += _breakdown(rows_by_model, lambda r: str(r.get("task", "-")), "task", n_bins, edge_rule)
    lines += _breakdown(rows_by_model, lambda r: difficulty_of(r.get("meta", {})), "difficulty", n_bins, edge_rule)
    md = out / "report.md"
    md.write_text("\n".join(lines))

    def interval_dict(iv: Interval) -> dict[str, Any]:
        return asdict(iv)

    payload = {
        "n": stats.n, "samples": stats.samples, "seed": stats.seed, "level": stats.level, "settings": stats.settings,
        "verdict": verdict(stats),
        "metrics": {m: {k: interval_dict(v) for k, v in d.items()} for m, d in stats.metrics.items()},
        "differences": {f"{b} - {a}": {k: interval_dict(v) for k, v in d.items()}
                        for (a, b), d in stats.differences.items()},
        "thresholds": {m: [{**r, "coverage": interval_dict(r["coverage"]),
                            "selective_accuracy": interval_dict(r["selective_accuracy"])} for r in rows]
                       for m, rows in stats.thresholds.items()},
        "sources": dict(sources or {}),
    }
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    return md
