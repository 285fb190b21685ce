"""Student/teacher prompt templates."""
from __future__ import annotations

import pytest

from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.templates import (
    PromptTemplates,
    TemplateError,
    render_student,
    render_teacher,
    template_fields,
)

REC = PromptRecord(id="r", question="3 4", reference="7", task="digit_sum", demonstration="7 Confidence: 1.0")


def test_defaults_render():
    t = PromptTemplates()
    assert render_student(t, REC) == "3 4"
    teacher = render_teacher(t, REC, demonstration="7 Confidence: 1.0", note="Note: sure")
    assert teacher == "7 Confidence: 1.0 Note: sure 3 4"
    assert render_teacher(t, REC, demonstration="d", note="") == "d  3 4"  # values are inserted verbatim


def test_custom_templates_and_literal_braces():
    t = PromptTemplates(student="Q {question} =", teacher="Reference: {demonstration} {note} {{x}} Q {question} =")
    assert render_student(t, REC) == "Q 3 4 ="
    assert render_teacher(t, REC, "7", "Note: hi") == "Reference: 7 Note: hi {x} Q 3 4 ="
    assert template_fields(t.teacher) == {"demonstration", "note", "question"}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"student": "Q {questoin}"}, "student template references unknown field {questoin}"),
        ({"teacher": "{demo} {question}"}, "teacher template references unknown field {demo}"),
        ({"student": "{demonstration} {question}"}, "privileged field {demonstration}"),
        ({"student": "{note} {question}"}, "privileged field {note}"),
        ({"student": "Q {question"}, "student template is malformed"),
        ({"teacher": "{} {question}"}, "positional field"),
        ({"student": "{question[0]}"}, "attribute or index access"),
        ({"student": "{question:{width}}"}, "nested field"),
        ({"student": "no field"}, "must contain {question}"),
        ({"teacher": "{demonstration}"}, "teacher template must contain {question}"),
        ({"student": 3}, "must be a string"),
    ],
)
def test_invalid_templates_are_rejected_at_construction(kwargs, message):
    with pytest.raises(TemplateError) as info:
        PromptTemplates(**kwargs)
    assert message in str(info.value)


def test_mutated_template_is_rechecked_at_render_time():
    t = PromptTemplates()
    t.student = "{question} {reference}"
    with pytest.raises(TemplateError, match=r"unknown field \{reference\}"):
        render_student(t, REC)
    t = PromptTemplates(student="{question:d}")
    with pytest.raises(TemplateError, match="cannot be rendered"):
        render_student(t, REC)


def test_teacher_values_must_be_strings():
    with pytest.raises(TypeError, match="note must be a str"):
        render_teacher(PromptTemplates(), REC, "d", None)  # type: ignore[arg-type]
