"""Repeat the embedded default over several seeds and report mean and spread of every metric.

Each seed runs `caopd demo run.seed=S` in its own process (so seeds cannot leak state into each other) and
its `summary.json` is collected. The acceptance criteria of the embedded default are checked per seed:
OPD's OCG >= +0.15, CaOPD's |OCG| <= 0.05, CaOPD's ECE <= half of OPD's, CaOPD's accuracy >= OPD's - 0.03.

    python benchmarks/bench_demo_seeds.py                 # seeds 1 2 3, results in benchmarks/results/
    python benchmarks/bench_demo_seeds.py --seeds 1 --out /tmp/r -- distill.steps=300
    python benchmarks/bench_demo_seeds.py --seeds 1 2 3 4 5 --previous benchmarks/results/demo_seeds.json  # adds 4, 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "ece", "brier", "ocg", "spr", "auroc")


def criteria(s: dict) -> dict[str, bool]:
    opd, ca = s["OPD"], s["CaOPD"]
    return {
        "OPD OCG >= +0.15": opd["ocg"] >= 0.15,
        "CaOPD |OCG| <= 0.05": abs(ca["ocg"]) <= 0.05,
        "CaOPD ECE <= OPD ECE / 2": ca["ece"] <= opd["ece"] / 2,
        "CaOPD acc >= OPD acc - 0.03": ca["accuracy"] >= opd["accuracy"] - 0.03,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--reuse", action="store_true", help="keep a seed's finished run (its summary.json) instead of rerunning it")
    ap.add_argument("--previous", type=Path, help="an earlier run's demo_seeds.json: its seeds are taken from it, not rerun")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.previous.read_text()) if args.previous else {}
    runs = {}
    for seed in args.seeds:
        if str(seed) in previous:
            runs[seed] = previous[str(seed)]
            print(f"seed {seed}: taken from {args.previous}", flush=True)
            continue
        run_dir = out / f"demo_seed{seed}"
        if args.reuse and (run_dir / "summary.json").is_file() and (run_dir / "seconds.txt").is_file():
            summary = json.loads((run_dir / "summary.json").read_text())
            summary["seconds"] = float((run_dir / "seconds.txt").read_text())
            runs[seed] = summary
            print(f"seed {seed}: reused {run_dir}", flush=True)
            continue
        t0 = time.time()
        cmd = [sys.executable, "-m", "caopd_megatron.cli.main", "demo", f"run.seed={seed}", f"rollout.seed={seed}",
               f"run.output_dir={run_dir}", "logging.progress=false", *args.overrides]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["seconds"] = time.time() - t0
        (run_dir / "seconds.txt").write_text(f"{summary['seconds']:.1f}\n")
        runs[seed] = summary
        print(f"seed {seed}: {summary['seconds']:.0f} s, " + ", ".join(
            f"{k}: {'ok' if v else 'FAIL'}" for k, v in criteria(summary).items()), flush=True)

    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for model in ("base", "OPD", "CaOPD"):
        cells = []
        for m in METRICS:
            vals = [runs[s][model][m] for s in args.seeds if runs[s][model][m] is not None]
            if not vals:
                cells.append("n/a")
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):+.3f} ± {sd:.3f}" if m == "ocg" else f"{statistics.mean(vals):.3f} ± {sd:.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    checks = {s: criteria(runs[s]) for s in args.seeds}
    seconds = [runs[s]["seconds"] for s in args.seeds]
    report = "\n".join([
        f"Embedded default over seeds {args.seeds} (mean ± sd), "
        f"{statistics.mean(seconds):.0f} s per seed on {os.cpu_count()} cores; overrides: {args.overrides or 'none'}",
        "", *lines, "",
        "Acceptance per seed: " + "; ".join(
            f"seed {s}: {sum(c.values())}/{len(c)} ({', '.join(k for k, v in c.items() if not v) or 'all met'})"
            for s, c in checks.items()),
    ])
    print("\n" + report)
    (out / "demo_seeds.md").write_text(report + "\n")
    (out / "demo_seeds.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
