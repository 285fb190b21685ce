"""The paper's prompt layout per task family: the student's confidence instruction and the teacher's two modes.

Design decisions:
- The student sees the task prompt with one confidence instruction added, and nothing else
  (``student = "{question}"``). Where the instruction goes is task-specific and follows the paper: for tool
  use on its own line right before ``Begin!`` (the ReAct prompt ends with "Begin!" and the question, so
  an instruction after the question would be read as part of it); for chemistry MCQ right after the
  system message's answer-format instructions, before the question; for math after the question, with
  the ``\\boxed{}`` request. ``with_confidence_instruction`` rewrites a record's question that way, once
  (a record that already carries the instruction is returned unchanged).
- The teacher has two modes. ``demonstration`` (SDFT-style): the task prompt, an example response (the
  gold demonstration) and a request for a response of its own. ``correct_solution`` (SDPO-style): the task
  prompt, a verified correct solution (e.g. a correct student rollout) and a request to solve the original
  question. In both, ``{note}`` (CaOPD's empirical-confidence note; empty for OPD) follows the example.
- The wording is ours; the structure (fields, order, where the instruction sits) is the paper's. The
  templates are ordinary ``PromptTemplates``, so they are validated like any configured template, and
  the config's ``data.student_template`` / ``data.teacher_template`` can be set to these strings.
- ``gold_demonstration`` renders a record's reference in the answer format the prompt asks for, with
  ``Confidence: 1.00``: every verifier must grade it correct (tests check that on the real eval sets).
"""
from __future__ import annotations

import dataclasses

from caopd_megatron.data.confidence import CONFIDENCE_MARKER
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.tasks.tooluse import format_tool_calls
from caopd_megatron.data.templates import PromptTemplates

__all__ = [
    "CONFIDENCE_INSTRUCTIONS",
    "TEACHER_MODES",
    "gold_demonstration",
    "paper_templates",
    "with_confidence_instruction",
]

STUDENT_TEMPLATE = "{question}"
TEACHER_MODES: dict[str, str] = {
    "demonstration": (
        "{question}\n\nHere is an example response to this question:\n{demonstration}\n{note}\n\n"
        "Now write a response of your own, including your reasoning.\n"
    ),
    "correct_solution": (
        "{question}\n\nA correct solution:\n{demonstration}\n{note}\n\n"
        "Solve the original question correctly.\n"
    ),
}

CONFIDENCE_INSTRUCTIONS: dict[str, str] = {
    "tooluse": (
        f"{CONFIDENCE_MARKER} how likely (0.0-1.0) this action is to succeed, written as a number only, "
        "with no words or explanation."
    ),
    "chemistry_mcq": (
        f"After </answer>, write one line '{CONFIDENCE_MARKER} <p>', where <p> is your confidence (0.0-1.0) "
        "that the chosen letter is correct, as a number only."
    ),
    "math": (
        "Put the final answer in \\boxed{}. Then write one line "
        f"'{CONFIDENCE_MARKER} <p>', where <p> is your confidence (0.0-1.0) that it is correct, as a number only."
    ),
}
_BEGIN_ANCHOR = "\n\nBegin!"


def paper_templates(mode: str = "demonstration") -> PromptTemplates:
    """Student and teacher templates of the given teacher mode (``demonstration`` or ``correct_solution``)."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
    return PromptTemplates(student=STUDENT_TEMPLATE, teacher=TEACHER_MODES[mode])


def _insert_instruction(rec: PromptRecord, instruction: str) -> str:
    question = rec.question
    if rec.task == "tooluse":
        if _BEGIN_ANCHOR in question:
            return question.replace(_BEGIN_ANCHOR, "\n" + instruction + _BEGIN_ANCHOR, 1)
        return question + "\n" + instruction
    if rec.task == "chemistry_mcq":
        messages = rec.meta.get("messages")
        if isinstance(messages, list) and len(messages) == 2 and all(isinstance(m, dict) for m in messages):
            system, user = (str(m.get("content", "")).strip() for m in messages)
            if messages[0].get("role") == "system" and question == f"{system}\n\n{user}":
                return f"{system}\n{instruction}\n\n{user}"
    return question + "\n\n" + instruction


def with_confidence_instruction(rec: PromptRecord) -> PromptRecord:
    """``rec`` with the task family's confidence instruction placed in its question (idempotent)."""
    instruction = CONFIDENCE_INSTRUCTIONS.get(rec.task)
    if instruction is None:
        raise ValueError(f"no confidence instruction for task {rec.task!r}; known: {', '.join(CONFIDENCE_INSTRUCTIONS)}")
    if instruction in rec.question:
        return rec
    return dataclasses.replace(rec, question=_insert_instruction(rec, instruction))


def gold_demonstration(rec: PromptRecord) -> str:
    """The reference in the answer format the task's prompt asks for, ending in ``Confidence: 1.00``."""
    if rec.task == "tooluse":
        body = format_tool_calls(rec.reference)
    elif rec.task == "chemistry_mcq":
        body = f"<reasoning>\nThe reference answer.\n</reasoning>\n<answer>\n{rec.reference.strip()}\n</answer>"
    elif rec.task == "math":
        body = f"The final answer is \\boxed{{{rec.reference.strip()}}}."
    else:
        body = rec.reference.strip()
    return f"{body}\n{CONFIDENCE_MARKER} 1.00"
