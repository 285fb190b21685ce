"""Training diagnostics over steps (one figure; several runs, e.g. OPD vs CaOPD, overlaid).

Design decisions:
- One panel per statistic of ``distill.step_diagnostics`` (student entropy, teacher entropy, divergence,
  teacher tail, advantage sd); in each, a colour per run and a line style per token group (answer solid,
  confidence dashed), so a confidence-token entropy collapse shows as one dashed curve falling to 0.
- Reads plain train-log rows (dicts), so it plots a live run's history and a finished run's
  ``train_log.jsonl`` alike; missing values (``None``: a group without tokens, no advantage) leave gaps.
- matplotlib's object API rendered by Agg (as ``reliability``): no global backend switch, no display.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from caopd_megatron.distill.step_diagnostics import GROUPS, STATISTICS

_STYLES = {"answer": "-", "confidence": "--"}
_TITLES = {"student_entropy": "student entropy H(p) (nats)", "teacher_entropy": "teacher entropy H(q) (nats)",
           "divergence": "divergence per token", "teacher_tail": "teacher mass outside student top-k",
           "advantage_sd": "advantage sd (sampled estimators)"}


def plot_diagnostics(runs: Mapping[str, Sequence[Mapping]], path: str, title: str = "") -> str:
    """Write the PNG of ``runs`` (name -> train-log rows with ``step`` and the diagnostic keys); returns path."""
    fig = Figure(figsize=(4.2 * 3, 3.4 * 2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    colours = [f"C{i}" for i in range(len(runs))]
    for ax, stat in zip(axes, STATISTICS):
        for colour, (name, rows) in zip(colours, runs.items()):
            for group in GROUPS:
                key = f"{group}_{stat}"
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, _STYLES[group], color=colour, label=f"{name} {group}", linewidth=1.2)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(_TITLES[stat], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes[:len(STATISTICS)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    axes[-1].axis("off")
    if handles:
        axes[-1].legend(handles, labels, loc="center", fontsize=9)
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
