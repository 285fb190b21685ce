"""Grade rollouts and build the revised distillation examples: CaOPD's one extra step.

Design decisions:
- This is the only place that knows about confidence rewriting. It turns graded rollouts
  (``data.grading``) into ``DistillExample``s (``data.records``) (student prompt ids, teacher prompt ids, response ids); the distillation step does
  not know whether they were rewritten. ``calibration.rewrite=false`` gives the OPD/SDFT baseline through
  exactly the same code path.
- Empirical confidence p = correct / K over the K samples of each prompt (all samples of a prompt in the
  batch count, whatever K is).
- Rewrite on: the response keeps its answer and its confidence span becomes ``Confidence: p``; it is
  re-tokenized (the answer's tokens are unchanged for whitespace-delimited tokenizers; for BPE a boundary
  token may merge differently, which is harmless since the revised text is what both models score). The
  teacher's demonstration has its confidence values replaced by p, and the note states p.
  Rewrite off: the sampled token ids are kept exactly, the demonstration is left as is, the note is empty.
- The teacher's demonstration defaults to the reference answer followed by ``Confidence: 1.0`` when the
  prompt record has none: a reference answer is what a privileged teacher is certain of.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

from caopd_megatron.calibration.confidence import (
    empirical_confidence,
    format_confidence,
    parse_confidence,
    rewrite_privileged_context,
    rewrite_response_confidence,
)
from caopd_megatron.config.schema import CalibrationConfig, DataConfig
from caopd_megatron.data.grading import grade_rollouts
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.records import DistillExample, RolloutRecord
from caopd_megatron.data.templates import PromptTemplates, render_student, render_teacher


def templates(data: DataConfig) -> PromptTemplates:
    return PromptTemplates(student=data.student_template, teacher=data.teacher_template)


def default_demonstration(rec: PromptRecord, marker: str) -> str:
    return rec.demonstration if rec.demonstration is not None else f"{rec.reference} {marker} 1.0"


def teacher_prompt_text(rec: PromptRecord, data: DataConfig, calib: CalibrationConfig, p: float | None) -> str:
    """The privileged prompt: demonstration (+ note when rewriting) + the question, in the teacher template."""
    demo = default_demonstration(rec, calib.marker)
    note = ""
    if p is not None:
        demo = rewrite_privileged_context(demo, p, calib.precision, calib.marker, note_template=None)
        if calib.note_template:
            note = calib.note_template.format(confidence=format_confidence(p, calib.precision))
    return render_teacher(templates(data), rec, demonstration=demo, note=note)


def student_prompt_text(rec: PromptRecord, data: DataConfig) -> str:
    return render_student(templates(data), rec)


def revise(rollouts: Sequence[RolloutRecord], prompts: Mapping[str, PromptRecord], tokenizer, data: DataConfig,
           calib: CalibrationConfig) -> list[DistillExample]:
    """Grade every rollout, compute p per prompt, and build the (rewritten or baseline) examples."""
    correct = grade_rollouts(rollouts, prompts)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for r, c in zip(rollouts, correct):
        by_prompt[r.prompt_id].append(c)
    p_of = {pid: empirical_confidence(cs) for pid, cs in by_prompt.items()}

    teacher_cache: dict[str, list[int]] = {}
    out = []
    for r, c in zip(rollouts, correct):
        rec = prompts[r.prompt_id]
        p = p_of[r.prompt_id]
        if r.prompt_id not in teacher_cache:
            text = teacher_prompt_text(rec, data, calib, p if calib.rewrite else None)
            teacher_cache[r.prompt_id] = tokenizer.encode(text)
        if calib.rewrite:
            text = rewrite_response_confidence(r.text, p, calib.precision, calib.marker)
            response_ids = tokenizer.encode(text) + [tokenizer.eos_id]
        else:
            text, response_ids = r.text, list(r.response_ids)
        out.append(DistillExample(
            prompt_id=r.prompt_id, sample_index=r.sample_index, student_prompt_ids=list(r.prompt_ids),
            teacher_prompt_ids=teacher_cache[r.prompt_id], response_ids=response_ids, correct=c,
            stated_confidence=parse_confidence(r.text, calib.marker), empirical_confidence=p, text=text))
    return out
