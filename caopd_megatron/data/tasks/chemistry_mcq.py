"""Chemistry multiple choice (SciKnowEval, options A-D): letter extraction and verification.

Design decisions:
- Only the answer part (text before the confidence marker) is searched, as for every task.
- The graded letter comes from the LAST complete ``<answer>...</answer>`` tag: a model that revises
  itself is graded on its final choice. "Last complete tag" is the last ``</answer>`` paired with the
  nearest ``<answer>`` before it, so a stray unmatched opening tag earlier cannot swallow it.
- Inside the tag the content must be one letter A-D (either case), optionally in parentheses or
  followed by a period, with any surrounding whitespace. Anything longer (the option text, two letters)
  counts as no answer: the prompt asks for the letter alone, and guessing which letter a sentence meant
  would reward hedging such as "A or B".
- Two fallbacks, both requiring the letter to stand alone: an unclosed ``<answer> X`` ending the answer
  part (output cut off before the closing tag; being the last tag, it wins over earlier complete ones),
  or, when there is no tag at all, an answer part that is a lone letter (the bare format).
- Every whitespace run in the letter pattern is possessive (``\\s*+``): whitespace and the literal
  characters around it are disjoint, so giving characters back can never help a match, and without it two
  adjacent optional runs backtrack quadratically (40k spaces inside a tag took 6.9 s; now linear).
- No letter found means incorrect, never an exception; a reference that is not A-D raises ValueError.
"""
from __future__ import annotations

import re

from caopd_megatron.data.tasks.base import extract_answer, register_normaliser, register_task

__all__ = ["TASK_NAME", "extract_choice", "verify_chemistry_mcq"]

TASK_NAME = "chemistry_mcq"

_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_LONE_LETTER = re.compile(r"\s*+\(?\s*+([A-Da-d])\s*+\)?\s*+\.?\s*+")


def _lone_letter(text: str) -> str | None:
    match = _LONE_LETTER.fullmatch(text)
    return match.group(1).upper() if match else None


def extract_choice(response: str) -> str | None:
    """The chosen letter (upper case) in ``response``, or None when no well-formed choice is present."""
    answer = extract_answer(response)
    opens = list(_OPEN.finditer(answer))
    closes = list(_CLOSE.finditer(answer))
    if opens and (not closes or opens[-1].start() > closes[-1].start()):
        # A final tag left open: output cut off (or the marker came) before the closing tag.
        letter = _lone_letter(answer[opens[-1].end() :])
        if letter is not None:
            return letter
    if closes:
        last_close = closes[-1]
        before = [m for m in opens if m.end() <= last_close.start()]
        if before:
            return _lone_letter(answer[before[-1].end() : last_close.start()])
    return _lone_letter(answer)


def verify_chemistry_mcq(response: str, reference: str) -> bool:
    """True when the letter chosen in ``response`` is the gold letter ``reference``."""
    gold = reference.strip().upper()
    if gold not in ("A", "B", "C", "D"):
        raise ValueError(f"chemistry_mcq reference must be one of A, B, C, D; got {reference!r}")
    return extract_choice(response) == gold


register_task(TASK_NAME, verify_chemistry_mcq)
# The normalised answer is the chosen letter (None without a well-formed choice).
register_normaliser(TASK_NAME, extract_choice)
