"""Reliability diagrams for one or more models (e.g. base / OPD / CaOPD), side by side.

Design decisions:
- Uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``) instead of ``pyplot``: no global
  backend switch (``matplotlib.use``) that would surprise other code in the same process, no
  global figure registry to leak, and no display needed. Output is always rendered by Agg to PNG.
- Each model gets one column: a tall reliability panel (accuracy bars per confidence bin, the
  diagonal, and the gap between each bin's accuracy and its MEAN confidence shaded, i.e. exactly the
  per-bin term of the ECE) over a short histogram of the share of samples per bin, annotated with
  the raw counts. The mean confidence is used rather than the bin centre because CaOPD confidences
  are k/K values that rarely sit at bin centres.
- The panel title carries accuracy, ECE and the signed overconfidence gap; all panels share the
  y-axis of the histogram row so sample concentration compares across models.
- Empty bins draw nothing (no zero-height bar that would read as "accuracy 0").
- The bins are taken from each report, so reports with any ``n_bins`` can be plotted together.
"""
from __future__ import annotations

import os
from typing import Mapping

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from caopd_megatron.evaluation.metrics import CalibrationReport

_BAR_COLOR = "#4C72B0"
_GAP_COLOR = "#DD5555"
_HIST_COLOR = "#8C8C8C"


def _draw_panel(ax: Axes, ax_hist: Axes, name: str, report: CalibrationReport) -> None:
    """Draw one model's reliability panel and bin histogram."""
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, zorder=3)
    for b in report.bins:
        if not b["count"]:
            continue
        width = b["hi"] - b["lo"]
        acc, conf = b["accuracy"], b["confidence"]
        ax.bar(b["lo"], acc, width=width, align="edge", color=_BAR_COLOR,
               edgecolor="white", linewidth=0.8, zorder=2)
        # The shaded box spans accuracy -> mean confidence: above the bar = overconfident bin.
        ax.bar(b["lo"], conf - acc, bottom=acc, width=width, align="edge", color=_GAP_COLOR,
               alpha=0.35, edgecolor=_GAP_COLOR, hatch="//", linewidth=0.8, zorder=2.5)
        ax.plot(b["lo"] + width / 2, conf, marker="o", markersize=3, color=_GAP_COLOR, zorder=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.tick_params(labelbottom=False)
    ax.grid(True, linewidth=0.4, alpha=0.5, zorder=0)
    ax.set_title(
        f"{name}\nacc {report.accuracy:.3f} | ECE {report.ece:.3f} | OCG {report.ocg:+.3f}",
        fontsize=10,
    )

    total = sum(b["count"] for b in report.bins) or 1
    for b in report.bins:
        if not b["count"]:
            continue
        share = b["count"] / total
        width = b["hi"] - b["lo"]
        ax_hist.bar(b["lo"], share, width=width, align="edge", color=_HIST_COLOR,
                    edgecolor="white", linewidth=0.8)
        ax_hist.annotate(str(b["count"]), (b["lo"] + width / 2, share), xytext=(0, 1),
                         textcoords="offset points", ha="center", va="bottom", fontsize=6)
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("confidence")
    ax_hist.grid(True, axis="y", linewidth=0.4, alpha=0.5)


def plot_reliability(reports: Mapping[str, CalibrationReport], path: str, title: str = "") -> str:
    """Write a side-by-side reliability diagram, one column per model, as a PNG.

    Args:
        reports: model name -> its :class:`CalibrationReport`, in display order.
        path: output PNG path; parent directories are created.
        title: optional figure title.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``reports`` is empty.
    """
    if not reports:
        raise ValueError("plot_reliability needs at least one report")
    path = os.fspath(path)
    n_panels = len(reports)
    # Constrained layout places the figure legend and titles without clipping; the width floor keeps
    # the one-row legend readable for a single panel.
    fig = Figure(figsize=(max(3.6 * n_panels + 0.4, 5.2), 5.4 if title else 5.1), dpi=130,
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, n_panels, height_ratios=[3.2, 1])
    hist_axes = []
    for col, (name, report) in enumerate(reports.items()):
        ax = fig.add_subplot(grid[0, col])
        ax_hist = fig.add_subplot(grid[1, col], sharex=ax,
                                  sharey=hist_axes[0] if hist_axes else None)
        hist_axes.append(ax_hist)
        _draw_panel(ax, ax_hist, name, report)
        if col == 0:
            ax_hist.set_ylabel("share", fontsize=9)
    top = max((b["count"] / max(r.n, 1) for r in reports.values() for b in r.bins), default=1.0)
    # Headroom above the tallest bar keeps its count label inside the axes, even at share 1.0.
    hist_axes[0].set_ylim(0, (top or 1.0) * 1.3)

    legend = [
        Patch(facecolor=_BAR_COLOR, label="accuracy per bin"),
        Patch(facecolor=_GAP_COLOR, alpha=0.35, edgecolor=_GAP_COLOR, hatch="//",
              label="gap to mean confidence"),
        Line2D([0], [0], linestyle="--", color="black", label="perfect calibration"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig.savefig(path, format="png")
    return path
