"""Prompt rows checked at start-up against what the job will do with them.

Design decisions:
- A row must name a registered task family and carry a reference its verifier accepts: verifiers raise
  ``ValueError`` for a malformed reference and return False for any response, so grading "" checks it.
- Length: refuse, never truncate (a cut question is another question). Every prompt a row becomes, plus the
  response budget (``max_new_tokens`` + EOS), must fit ``model.max_position_embeddings``; text over 64
  characters per available token is refused before tokenizing, so a 1 MB question costs nothing.
- ``on_bad_row="fatal"`` raises naming the row; ``"skip"`` drops it and the caller prints the counts.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from caopd_megatron.data.prompts import PromptDataError, PromptRecord
from caopd_megatron.data.tasks.base import UnknownTaskError, get_verifier

MAX_CHARS_PER_TOKEN = 64

Render = Callable[[PromptRecord], Sequence[tuple[str, str]]]  # record -> [(what, prompt text), ...]


def _reference_problem(task: str, reference: str) -> str | None:
    try:
        verifier = get_verifier(task)
    except UnknownTaskError as exc:
        return f"unknown task family: {exc}"
    try:
        verifier("", reference)
    except ValueError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the {task!r} verifier rejects its reference: {reason}"
    return None


def _length_problem(render: Render, rec: PromptRecord, encode: Callable[[str], list[int]], context: int,
                    response_tokens: int) -> str | None:
    room = context - response_tokens
    for what, text in render(rec):
        if len(text) > room * MAX_CHARS_PER_TOKEN:
            return (f"the {what} is {len(text):,} characters, far beyond the {room} tokens the context leaves "
                    f"(model.max_position_embeddings={context} minus {response_tokens} for the response)")
        n = len(encode(text))
        if n > room:
            return (f"the {what} is {n} tokens after templating; with {response_tokens} for the response it "
                    f"exceeds model.max_position_embeddings={context} (rows are refused, not truncated)")
    return None


def check_prompt_rows(records: Iterable[PromptRecord], *, source: str, render: Render,
                      encode: Callable[[str], list[int]], context: int, response_tokens: int,
                      on_bad_row: str) -> tuple[list[PromptRecord], list[str]]:
    """The rows that pass, and one "source: row 'id': why" message per dropped row (``on_bad_row="skip"``)."""
    kept: list[PromptRecord] = []
    dropped: list[str] = []
    reference_cache: dict[tuple[str, str], str | None] = {}
    for rec in records:
        key = (rec.task, rec.reference)
        if key not in reference_cache:
            reference_cache[key] = _reference_problem(*key)
        problem = reference_cache[key] or _length_problem(render, rec, encode, context, response_tokens)
        if problem is None:
            kept.append(rec)
            continue
        message = f"{source}: row {rec.id!r}: {problem}"
        if on_bad_row != "skip":
            raise PromptDataError(message + " (data.on_bad_row=skip drops such rows)")
        dropped.append(message)
    if not kept:
        raise PromptDataError(f"{source}: no usable prompt rows; first problem: {dropped[0]}")
    return kept, dropped
