"""Self-consistency confidence vs verified accuracy on the same rollouts of the embedded task.

A tiny model is warmed up briefly (SFT), then samples K responses for each of N held-out digit-sum prompts.
Per prompt, on the same samples, four confidences are computed:
  verified     p = share the verifier accepts (the default, ``calibration.confidence_source=verifier``)
  anchored     p = share agreeing with the privileged demonstration's answer (``self_consistency``)
  anchored_30  the same with 30% of the demonstrations carrying a wrong answer (a fallible teacher)
  modal        p = share of the modal answer (``self_consistency`` without an anchor)
and each is compared with ``verified``: mean absolute difference and Pearson correlation over prompts.

    python benchmarks/bench_self_consistency.py                       # 512 prompts x K=8, 150 warm-up steps
    python benchmarks/bench_self_consistency.py --prompts 64 --warmup-steps 20 --out /tmp/sc
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from caopd_megatron.calibration.revise import self_consistency_grades
from caopd_megatron.calibration.self_consistency import agreement
from caopd_megatron.config.loader import load_config
from caopd_megatron.data.grading import grade_rollouts
from caopd_megatron.data.tasks.base import get_normaliser
from caopd_megatron.pipeline.session import build_student, eval_prompts, open_session, train_prompts
from caopd_megatron.pipeline.warmup import WarmupData, run_warmup
from caopd_megatron.rollout.engine import rollout

ROOT = Path(__file__).resolve().parents[1]


def per_prompt(rollouts, flags) -> dict[str, float]:
    groups = defaultdict(list)
    for r, f in zip(rollouts, flags):
        groups[r.prompt_id].append(bool(f))
    return {pid: sum(v) / len(v) for pid, v in groups.items()}


def compare(p: dict[str, float], verified: dict[str, float]) -> dict[str, float]:
    keys = sorted(verified)
    a, b = [p[k] for k in keys], [verified[k] for k in keys]
    mad = sum(abs(x - y) for x, y in zip(a, b)) / len(keys)
    corr = statistics.correlation(a, b) if len(set(a)) > 1 and len(set(b)) > 1 else float("nan")
    return {"mean_p": sum(a) / len(a), "mean_abs_diff_vs_verified": mad, "pearson_vs_verified": corr}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides=[f"warmup.steps={args.warmup_steps}", "warmup.batch_size=128",
                                 f"rollout.samples_per_prompt={args.samples}", "logging.progress=false",
                                 "logging.level=WARNING", f"run.output_dir={tempfile.mkdtemp(prefix='sc_run_')}"])
    t0 = time.time()
    s = open_session(cfg)
    student = build_student(s)
    run_warmup(student, WarmupData(train_prompts(s), s.tokenizer, cfg, seed=cfg.run.seed), cfg, s.vocab.real,
               s.tokenizer.pad_id)
    prompts = eval_prompts(s)[:args.prompts]
    by_id = {p.id: p for p in prompts}
    rolls = rollout(student, prompts, s.tokenizer, cfg, s.vocab.real, step=0)

    verified = per_prompt(rolls, grade_rollouts(rolls, by_id))
    anchored = per_prompt(rolls, self_consistency_grades(rolls, by_id, cfg.calibration.marker)[0])
    rng = random.Random(0)
    fallible = {pid: dataclasses.replace(p, demonstration=f"{(int(p.reference) + rng.randrange(1, 10)) % 10} "
                                                          f"{cfg.calibration.marker} 1.0")
                if rng.random() < 0.3 else p for pid, p in by_id.items()}
    anchored_30 = per_prompt(rolls, self_consistency_grades(rolls, fallible, cfg.calibration.marker)[0])
    answers = defaultdict(list)
    for r in rolls:
        answers[r.prompt_id].append(get_normaliser(by_id[r.prompt_id].task)(r.text))
    modal_flags = {pid: iter(agreement(a, None)) for pid, a in answers.items()}
    modal = per_prompt(rolls, [next(modal_flags[r.prompt_id]) for r in rolls])

    result = {"prompts": len(prompts), "samples_per_prompt": args.samples, "warmup_steps": args.warmup_steps,
              "verified_mean_p": sum(verified.values()) / len(verified),
              "anchored": compare(anchored, verified), "anchored_30pct_wrong_demos": compare(anchored_30, verified),
              "modal": compare(modal, verified), "seconds": round(time.time() - t0, 1)}
    (out / "self_consistency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| confidence source | mean p | mean abs diff vs verified | Pearson r vs verified |", "|---|---|---|---|",
             f"| verified (default) | {result['verified_mean_p']:.3f} | 0 | 1 |"]
    for name in ("anchored", "anchored_30pct_wrong_demos", "modal"):
        r = result[name]
        lines.append(f"| {name} | {r['mean_p']:.3f} | {r['mean_abs_diff_vs_verified']:.3f} | "
                     f"{r['pearson_vs_verified']:.3f} |")
    table = "\n".join(lines)
    (out / "self_consistency.md").write_text(
        f"{len(prompts)} held-out digit-sum prompts x K={args.samples}, model warmed up {args.warmup_steps} steps; "
        f"command: python benchmarks/bench_self_consistency.py --prompts {args.prompts} --samples {args.samples} "
        f"--warmup-steps {args.warmup_steps}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
