"""The objectives around CaOPD under one pipeline: one warm-up, the same start and rollout seed for every variant.

The embedded default (the ``caopd demo`` preset) is warmed up once; from that same student, with the same
rollout seed, the same prompts and the same teacher-format replay rows (each run gets its own fork of the
warm-up's row source), every variant distils for the same number of steps and is evaluated on the same
held-out questions. The building blocks are the demo's (``pipeline/demo.py``: ``warm_up``,
``distill_from_warm_start``, ``evaluate_student``), so OPD and CaOPD here are the demo's runs.

Variants (each is config overrides on top of the preset; ``base`` is the warm student, no distillation):
    base, opd (rewrite off), caopd (reverse KL), caopd_vopd (full baseline), caopd_mixed (w = 0.5),
    caopd_teacher_prefixes (rollout.prefix_source=teacher)
Writes ``objectives.md`` / ``objectives.json`` (accuracy, ECE, Brier, OCG, SPR, AUROC, s/step) and
``objectives_diagnostics.png`` (OPD vs CaOPD: answer vs confidence tokens over steps) to ``--out``.

    python benchmarks/bench_objectives.py                        # full size, results in benchmarks/results/
    python benchmarks/bench_objectives.py --quick --out /tmp/obj # tiny model, 3 distill steps
    python benchmarks/bench_objectives.py --steps 100 --variants opd caopd -- run.seed=2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caopd_megatron.config.loader import load_config, preset_path  # noqa: E402
from caopd_megatron.evaluation.diagnostics_plot import plot_diagnostics  # noqa: E402
from caopd_megatron.pipeline.demo import distill_from_warm_start, evaluate_student, warm_up  # noqa: E402
from caopd_megatron.runtime import distributed, run_lock  # noqa: E402

# name -> (table label, overrides on top of the preset); None: no distillation (the warm student).
VARIANTS: dict[str, tuple[str, list[str] | None]] = {
    "base": ("base (no distillation)", None),
    "opd": ("OPD (reverse KL, rewrite off)", ["calibration.rewrite=false"]),
    "caopd": ("CaOPD, reverse KL", ["calibration.rewrite=true"]),
    "caopd_vopd": ("CaOPD, vOPD (full baseline)", ["calibration.rewrite=true", "distill.loss=vopd",
                                                   "distill.vopd_baseline=full"]),
    "caopd_mixed": ("CaOPD, mixed KL (w = 0.5)", ["calibration.rewrite=true", "distill.loss=mixed",
                                                  "distill.mix_weight=0.5"]),
    "caopd_teacher_prefixes": ("CaOPD, teacher prefixes", ["calibration.rewrite=true",
                                                           "rollout.prefix_source=teacher"]),
}
METRICS = ("accuracy", "ece", "brier", "ocg", "spr", "auroc")
# --quick: the test suite's tiny model and task (a few seconds per variant).
QUICK = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
         "task.n_train=64", "task.n_eval=40", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "warmup.steps=30", "warmup.batch_size=32", "distill.steps=3", "run.threads=1"]
DIAGNOSTICS_PAIR = ("opd", "caopd")


def run_variants(names: list[str], overrides: list[str], run_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    """Warm up once, then distil and evaluate each of ``names``: the JSON-ready results and each run's log rows."""
    files = [preset_path("demo")]
    common = [*overrides, f"run.output_dir={run_dir}", "logging.progress=false", "logging.level=WARNING"]
    cfg = load_config(files, common)
    t0 = time.perf_counter()
    ws = warm_up(cfg)
    results = {"warmup_seconds": time.perf_counter() - t0, "distill_steps": cfg.distill.steps, "variants": {}}
    histories: dict[str, list[dict]] = {}
    start = ws.data.fork()  # every run replays the same rows: its own fork of the row source at the warm start
    for name in names:
        label, extra = VARIANTS[name]
        entry: dict = {"label": label, "overrides": extra or []}
        if extra is None:
            ws.student.load_state_dict(ws.state)
            history, seconds = [], None
        else:
            run_cfg = load_config(files, [*common, *extra])
            t0 = time.perf_counter()
            history = distill_from_warm_start(ws, run_cfg, name, replay_data=start.fork())
            seconds = time.perf_counter() - t0
        report, _ = evaluate_student(ws, name)
        entry.update({m: report.to_dict()[m] for m in (*METRICS, "parse_rate")})
        entry["seconds_per_step"] = None if seconds is None else seconds / max(1, len(history))
        entry["losses"] = [row["loss"] for row in history]  # per step: the direct-run check compares them
        entry["grad_norms"] = [row["grad_norm"] for row in history]
        results["variants"][name] = entry
        histories[name] = history
        print(f"{name}: " + ", ".join(f"{m} {fmt(entry[m])}" for m in METRICS), flush=True)
    return results, histories


def fmt(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def markdown(results: dict, command: str) -> str:
    lines = ["| variant | overrides | accuracy | ECE | Brier | OCG | SPR | AUROC | s/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in results["variants"].values():
        overrides = " ".join(f"`{o}`" for o in entry["overrides"]) or "(warm-up only)"
        cells = [fmt(entry[m], signed=m == "ocg") for m in METRICS]
        step = "n/a" if entry["seconds_per_step"] is None else f"{entry['seconds_per_step']:.2f}"
        lines.append(f"| {entry['label']} | {overrides} | " + " | ".join(cells) + f" | {step} |")
    return "\n".join([
        f"Command: `{command}`",
        "",
        f"One warm-up ({results['warmup_seconds']:.0f} s), then {results['distill_steps']} distillation steps per "
        f"variant from the same student with the same rollout seed and replay rows (`caopd demo` preset); "
        f"{os.cpu_count()} CPU cores; s/step includes the rollouts.",
        "",
        *lines,
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=None, help="distillation steps per variant (default: the preset's)")
    ap.add_argument("--quick", action="store_true", help="tiny model and task, 3 distillation steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--run-dir", default=None, help="the session's run directory (default: a fresh temp dir)")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) for every variant")
    args = ap.parse_args(argv)
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    if args.steps is not None:
        overrides.append(f"distill.steps={args.steps}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="objectives_run_"))
    command = " ".join(["python benchmarks/bench_objectives.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        results, histories = run_variants(args.variants, overrides, run_dir)
    finally:
        distributed.teardown()
        run_lock.release_held_locks()
    results["command"] = command
    (out / "objectives.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results, command)
    if all(n in results["variants"] for n in DIAGNOSTICS_PAIR):
        png = out / "objectives_diagnostics.png"
        plot_diagnostics({results["variants"][n]["label"]: histories[n] for n in DIAGNOSTICS_PAIR},
                         str(png), title="OPD vs CaOPD: answer vs confidence tokens")
        table += f"\nDiagnostics (OPD vs CaOPD, answer vs confidence tokens): `{png.name}`\n"
    (out / "objectives.md").write_text(table)
    print("\n" + table)
    gc.freeze()  # skip the interpreter's final collection passes over megatron's object graph


if __name__ == "__main__":
    main()
