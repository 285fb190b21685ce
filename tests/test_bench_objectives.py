"""benchmarks/bench_objectives.py on a tiny model: the table has every variant, and each variant's numbers are
the ones its direct run gives.

Direct runs: the CaOPD variants again in one session of their own, in reverse order (``--variants`` last to
first: its own warm-up; the first of them runs with nothing before it, every other one after other variants
than in the table), and ``caopd demo`` with the same overrides, whose base and OPD are the same building
blocks called by the CLI. Equality is exact (metrics and every step's loss and gradient norm): the variants
share one warm-up, one rollout seed and one replay stream, so neither the order nor the company of a variant
may change it. (One reversed session instead of one session per variant: a process start and a warm-up
each cost more than a variant's two steps.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks.bench_objectives import QUICK, VARIANTS  # noqa: E402
from test_cli_e2e import caopd, clean_env, read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
NUMBERS = ("accuracy", "ece", "brier", "ocg", "spr", "auroc", "parse_rate", "losses", "grad_norms")


def bench(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "benchmarks/bench_objectives.py", "--quick", "--steps", str(STEPS),
                           "--out", str(out), "--run-dir", str(out / "run"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "objectives.json").read_text())


@pytest.mark.slow
def test_the_table_has_every_variant_with_its_direct_runs_numbers(tmp_path: Path) -> None:
    table = bench(tmp_path / "all")
    assert list(table["variants"]) == list(VARIANTS)
    markdown = (tmp_path / "all" / "objectives.md").read_text()
    for label, _ in VARIANTS.values():
        assert f"| {label} |" in markdown
    assert (tmp_path / "all" / "objectives_diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table["variants"]
    assert rows["base"]["seconds_per_step"] is None and rows["base"]["losses"] == []
    for name, row in rows.items():
        if name != "base":
            assert len(row["losses"]) == STEPS and row["seconds_per_step"] > 0
    # The objectives really differ: no two distillation variants share a loss trajectory.
    trajectories = [tuple(row["losses"]) for name, row in rows.items() if name != "base"]
    assert len(set(trajectories)) == len(trajectories)

    reverse = list(VARIANTS)[:1:-1]  # the table's CaOPD variants (all after base and OPD), last to first
    assert reverse[-1] == "caopd" and len(reverse) >= 4
    direct = bench(tmp_path / "reverse", "--variants", *reverse)["variants"]
    assert list(direct) == reverse
    for name in reverse:
        assert {k: direct[name][k] for k in NUMBERS} == {k: rows[name][k] for k in NUMBERS}, name

    demo = tmp_path / "demo"
    caopd("demo", *QUICK, f"distill.steps={STEPS}", "logging.progress=false", "logging.level=WARNING",
          f"run.output_dir={demo}")
    summary = json.loads((demo / "summary.json").read_text())
    opd_log = read_jsonl(demo / "opd" / "train_log.jsonl")
    for name, demo_name in (("base", "base"), ("opd", "OPD")):
        assert {k: summary[demo_name][k] for k in NUMBERS[:7]} == {k: rows[name][k] for k in NUMBERS[:7]}, name
    assert [r["loss"] for r in opd_log] == rows["opd"]["losses"]
    assert [r["grad_norm"] for r in opd_log] == rows["opd"]["grad_norms"]
