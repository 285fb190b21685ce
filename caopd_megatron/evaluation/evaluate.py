"""Evaluate a student: greedy answers on held-out prompts, graded, with their stated confidence.

Design decisions:
- Greedy decoding (temperature 0) with the same sampler as rollouts, so evaluation measures the policy
  the student would deploy, deterministically.
- A response is well-formed when it has a parseable ``Confidence:`` value; a missing confidence scores 0
  (the metrics module's rule), so a model cannot look calibrated by omitting it.
- Per-prompt rows are written next to the metrics (JSONL) so any figure can be recomputed or sliced
  (e.g. by difficulty) later.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from caopd_megatron.calibration.confidence import parse_confidence
from caopd_megatron.calibration.revise import student_prompt_text
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.grading import grade_response
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.evaluation.metrics import CalibrationReport, calibration_report
from caopd_megatron.rollout.sampler import SamplingParams, generate


@dataclass
class EvalRow:
    prompt_id: str
    text: str
    correct: bool
    confidence: float | None
    meta: dict


def evaluate_model(model, prompts: Sequence[PromptRecord], tokenizer, cfg: CaOPDConfig, real_vocab_size: int,
                   desc: str | None = "evaluate") -> tuple[CalibrationReport, list[EvalRow]]:
    ids = [tokenizer.encode(student_prompt_text(r, cfg.data)) for r in prompts]
    params = SamplingParams(max_new_tokens=cfg.evaluation.max_new_tokens, temperature=0.0)
    gens = generate(model, ids, params, eos_id=tokenizer.eos_id, real_vocab_size=real_vocab_size,
                    batch_size=cfg.evaluation.batch_size, desc=desc)
    rows = []
    for rec, g in zip(prompts, gens):
        text = tokenizer.decode([t for t in g.response_ids if t != tokenizer.eos_id])
        correct = grade_response(rec, text)
        rows.append(EvalRow(rec.id, text, correct, parse_confidence(text, cfg.calibration.marker), dict(rec.meta)))
    report = calibration_report([r.correct for r in rows], [r.confidence for r in rows],
                                n_bins=cfg.evaluation.n_bins)
    return report, rows


def write_eval(out_dir: str | Path, name: str, report: CalibrationReport, rows: Sequence[EvalRow]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_metrics.json").write_text(json.dumps(report.to_dict(), indent=2))
    with open(out / f"{name}_responses.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r.__dict__) + "\n")
    return out / f"{name}_metrics.json"
