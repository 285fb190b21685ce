"""The paper's prompt layout on every real eval record: instruction placement, both teacher modes, gold graded."""
from __future__ import annotations

import random

import pytest

from caopd_megatron.data.confidence import parse_confidence
from caopd_megatron.data.prompts import PromptRecord, load_chemistry_mcq, load_tooluse
from caopd_megatron.data.tasks.base import get_verifier
from caopd_megatron.data.tasks.paper_prompts import (
    CONFIDENCE_INSTRUCTIONS,
    TEACHER_MODES,
    gold_demonstration,
    paper_templates,
    with_confidence_instruction,
)
from caopd_megatron.data.templates import TemplateError, render_student, render_teacher

from real_eval import real_eval_file

NOTE = "Note: the student's empirical confidence on this question is 0.38."


def _real_records() -> list[PromptRecord]:
    return (load_chemistry_mcq(real_eval_file("chemistry_mcq_eval.jsonl"))
            + load_tooluse(real_eval_file("tooluse_eval.jsonl")))


@pytest.mark.parametrize("mode", sorted(TEACHER_MODES))
def test_every_real_record_renders_in_both_modes(mode):
    templates = paper_templates(mode)
    records = _real_records()
    assert len(records) == 507 + 97
    for rec in records:
        instruction = CONFIDENCE_INSTRUCTIONS[rec.task]
        prepared = with_confidence_instruction(rec)
        assert with_confidence_instruction(prepared) is prepared  # placed once
        student = render_student(templates, prepared)
        assert student.count(instruction) == 1, rec.id
        if rec.task == "tooluse":
            # The instruction is the line right before "Begin!", and the question after it is untouched.
            before, after = student.split("\n\nBegin!", 1)
            assert before.endswith("\n" + instruction), rec.id
            assert rec.question.split("\n\nBegin!", 1)[1] == after
        else:
            system, user = (m["content"].strip() for m in rec.meta["messages"])
            assert student == f"{system}\n{instruction}\n\n{user}", rec.id
        demo = gold_demonstration(rec)
        teacher = render_teacher(templates, prepared, demonstration=demo, note=NOTE)
        assert teacher.startswith(student) and demo in teacher and NOTE in teacher
        assert demo not in student and NOTE not in student
        # The gold demonstration is what the verifier calls correct, stating full confidence.
        assert get_verifier(rec.task)(demo, rec.reference), rec.id
        assert parse_confidence(demo) == 1.0


def test_perturbed_gold_is_graded_wrong_on_every_real_chemistry_record():
    rng = random.Random(0)
    for rec in load_chemistry_mcq(real_eval_file("chemistry_mcq_eval.jsonl")):
        wrong = rng.choice([x for x in "ABCD" if x != rec.reference])
        demo = gold_demonstration(rec).replace(f"<answer>\n{rec.reference}\n", f"<answer>\n{wrong}\n")
        assert not get_verifier(rec.task)(demo, rec.reference), rec.id


def test_modes_differ_and_unknown_mode_is_refused():
    rec = PromptRecord(id="m1", question="What is 1/2 + 1/4?", reference="3/4", task="math")
    prepared = with_confidence_instruction(rec)
    assert prepared.question.startswith(rec.question) and "\\boxed{}" in prepared.question
    demo_prompt = render_teacher(paper_templates("demonstration"), prepared, gold_demonstration(rec), "")
    solution_prompt = render_teacher(paper_templates("correct_solution"), prepared, gold_demonstration(rec), "")
    assert "example response" in demo_prompt and "correct solution" in solution_prompt.lower()
    assert get_verifier("math")(gold_demonstration(rec), "0.75")
    with pytest.raises(ValueError, match="teacher mode"):
        paper_templates("few_shot")
    with pytest.raises(ValueError, match="confidence instruction"):
        with_confidence_instruction(PromptRecord(id="d", question="1 2", reference="3", task="digit_sum"))


def test_paper_templates_never_leak_privileged_fields_to_the_student():
    for mode in TEACHER_MODES:
        t = paper_templates(mode)
        t.student = "{question} {demonstration}"
        with pytest.raises(TemplateError, match="privileged"):
            render_student(t, PromptRecord(id="x", question="q", reference="1", task="math"))
