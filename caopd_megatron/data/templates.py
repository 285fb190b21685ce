"""Prompt templates: the plain student prompt and the privileged teacher prompt.

Design decisions:
- Templates are ``str.format`` strings with named fields only. The student template may use
  ``{question}``; the teacher template may use ``{question}``, ``{demonstration}`` and ``{note}``.
  The actual wording is configuration (the lead's config sets it); these defaults are only generic.
- Templates are validated when built and again when rendered (a dataclass can be mutated in between),
  so a typo in a config fails at start-up with a message naming the template and the field, not with a
  KeyError deep inside a rollout.
- A student template that references ``{demonstration}`` or ``{note}`` is rejected with its own message:
  leaking the privileged context to the student would silently turn on-policy distillation into
  answer copying.
- Both templates must contain ``{question}``: without it the model would be conditioned on nothing
  about the task, which is always a configuration mistake.
- Only bare field names are allowed: no positional ``{}``/``{0}``, no attribute or index access
  (``{question.upper}``, ``{question[0]}``) and no nested fields in format specs. They have no use here
  and make the set of referenced values hard to check. Literal braces are written ``{{`` and ``}}``.
- Rendering inserts the values verbatim and does not touch whitespace (an empty note leaves its
  separators), because real tokenizers are whitespace-sensitive and any normalisation here would make
  the rendered prompt differ from what the config says.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

from caopd_megatron.data.prompts import PromptRecord

__all__ = [
    "STUDENT_FIELDS",
    "TEACHER_FIELDS",
    "PromptTemplates",
    "TemplateError",
    "render_student",
    "render_teacher",
    "template_fields",
    "validate_templates",
]

STUDENT_FIELDS: frozenset[str] = frozenset({"question"})
TEACHER_FIELDS: frozenset[str] = frozenset({"question", "demonstration", "note"})
_PRIVILEGED = TEACHER_FIELDS - STUDENT_FIELDS


class TemplateError(ValueError):
    """A prompt template is malformed or references a field it may not use."""


def template_fields(template: str, name: str = "template") -> set[str]:
    """The field names ``template`` references; a malformed template raises TemplateError."""
    if not isinstance(template, str):
        raise TemplateError(f"{name} template must be a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(
            f"{name} template is malformed ({exc}); write literal braces as '{{{{' and '}}}}'"
        ) from None
    fields: set[str] = set()
    for _literal, field_name, format_spec, _conversion in parsed:
        if field_name is None:
            continue
        if field_name == "" or field_name.isdigit():
            raise TemplateError(f"{name} template uses a positional field {{{field_name}}}; use named fields")
        if any(c in field_name for c in ".[]"):
            raise TemplateError(
                f"{name} template field {{{field_name}}} uses attribute or index access; use a bare field name"
            )
        if format_spec and "{" in format_spec:
            raise TemplateError(f"{name} template field {{{field_name}}} has a nested field in its format spec")
        fields.add(field_name)
    return fields


def _check(template: str, name: str, allowed: frozenset[str]) -> None:
    fields = template_fields(template, name)
    for field_name in sorted(fields - allowed):
        if name == "student" and field_name in _PRIVILEGED:
            raise TemplateError(
                f"student template references the privileged field {{{field_name}}}; "
                "only the teacher may see the demonstration and note"
            )
        raise TemplateError(
            f"{name} template references unknown field {{{field_name}}}; "
            f"allowed fields: {', '.join('{' + f + '}' for f in sorted(allowed))}"
        )
    if "question" not in fields:
        raise TemplateError(f"{name} template must contain {{question}}")


@dataclass
class PromptTemplates:
    student: str = "{question}"  # plain prompt the student sees
    teacher: str = "{demonstration} {note} {question}"  # privileged prompt the teacher sees

    def __post_init__(self) -> None:
        validate_templates(self)


def validate_templates(t: PromptTemplates) -> None:
    """Raise TemplateError if either template is malformed or uses a field it may not."""
    _check(t.student, "student", STUDENT_FIELDS)
    _check(t.teacher, "teacher", TEACHER_FIELDS)


def _format(template: str, name: str, **values: str) -> str:
    try:
        return template.format(**values)
    except (ValueError, TypeError) as exc:  # e.g. a format spec like {question:d} that str rejects
        raise TemplateError(f"{name} template cannot be rendered: {exc}") from None


def _require_str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    return value


def render_student(t: PromptTemplates, rec: PromptRecord) -> str:
    """The student's prompt for ``rec``."""
    _check(t.student, "student", STUDENT_FIELDS)
    return _format(t.student, "student", question=rec.question)


def render_teacher(t: PromptTemplates, rec: PromptRecord, demonstration: str, note: str) -> str:
    """The teacher's privileged prompt for ``rec`` with the given demonstration and note."""
    _check(t.teacher, "teacher", TEACHER_FIELDS)
    return _format(
        t.teacher,
        "teacher",
        question=rec.question,
        demonstration=_require_str(demonstration, "demonstration"),
        note=_require_str(note, "note"),
    )
