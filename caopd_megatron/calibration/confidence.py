"""Parse, format and rewrite the verbalised ``Confidence: <p>`` that ends a student response.

CaOPD replaces the student's self-reported confidence with the student-grounded confidence
``p = correct / K`` (the empirical accuracy over K graded samples of the same prompt), both in the
response the student is trained on and in the teacher's privileged context. The answer text is kept.

Design decisions:
- Only the FIRST occurrence of the marker counts, both for parsing and for rewriting, so that the
  parsed value and the rewritten span always refer to the same place. If the first marker carries no
  number (``Confidence: high``) the parse is ``None`` even if a later marker has one: a later value is
  not the one the response committed to first.
- The marker is case-sensitive by default (``confidence: 0.7`` is not a confidence line), because the
  prompt asks for the exact marker and a case-insensitive match would also catch prose such as
  "my confidence: ..." mid-answer. ``ignore_case=True`` opts into a case-insensitive match.
- Number grammar after the marker: optional spaces/tabs (not newlines), an optional sign, then
  ``1``, ``1.``, ``0.7`` or ``.7`` with an optional exponent (``7e-1``), then an optional ``%`` which may
  be preceded by spaces. Everything after the number is ignored. The matched substring is converted
  with ``float`` only; nothing is ever evaluated.
- Percent rule: a ``%`` ALWAYS means "divide by 100" (``70%`` -> 0.7, ``0.7%`` -> 0.007). Without
  ``%`` the value is taken literally, so ``Confidence: 70`` is out of range and parses to ``None``;
  we never guess that a bare number > 1 was meant as a percentage.
- Values outside [0, 1] after conversion, and any negative sign (even ``-0``), parse to ``None``: the
  response did not state a usable probability.
- Formatting rounds HALF-UP on the shortest decimal representation of the float (``repr``), via
  ``decimal``; e.g. 0.125 -> "0.13" and 0.285 -> "0.29". Python's ``round``/``%.2f`` would give
  "0.12" (banker's rounding) and "0.28" (binary representation), which makes k/K values round
  inconsistently. Values are clamped to [0, 1] first; NaN is rejected.
- Rewriting a response replaces the span from the first marker to the END of the text (including any
  trailing newline or later ``Confidence:`` lines) by ``"<marker> <p>"``; everything before the marker
  is kept byte-for-byte. Without a marker the answer's trailing whitespace is stripped and
  ``separator + "<marker> <p>"`` is appended. Both paths are idempotent for a fixed ``p``.
- In the teacher's privileged context EVERY ``marker + number`` occurrence has only its number (and
  ``%``) replaced, keeping the marker and the spacing after it; a marker with no number (e.g. a
  template ``Confidence: <your confidence>``) is left alone. The note is then inserted at the
  placeholder (all occurrences) or appended on its own line. When ``note_template`` is ``None`` an
  unused placeholder is stripped, so no literal ``{note}`` ever reaches the teacher.
"""
from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Sequence

from caopd_megatron.config.schema import CONFIDENCE_MARKER

DEFAULT_NOTE_TEMPLATE = "Note: the student's empirical confidence on this question is {confidence}."
DEFAULT_NOTE_PLACEHOLDER = "{note}"

# Number grammar shared by parsing and context rewriting (see module docstring).
_NUMBER_PATTERN = (
    r"(?P<value>(?P<sign>[+-]?)(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"(?P<percent>[ \t]*%)?"
)

_pattern_cache: dict[tuple[str, bool], re.Pattern[str]] = {}


def _value_pattern(marker: str, ignore_case: bool) -> re.Pattern[str]:
    """Compiled ``marker + spaces + number`` pattern, cached because rollouts call this per sample."""
    key = (marker, ignore_case)
    pattern = _pattern_cache.get(key)
    if pattern is None:
        if not marker:
            raise ValueError("marker must be a non-empty string")
        flags = re.IGNORECASE if ignore_case else 0
        pattern = re.compile(
            r"(?P<marker>" + re.escape(marker) + r")(?P<space>[ \t]*)" + _NUMBER_PATTERN, flags
        )
        _pattern_cache[key] = pattern
    return pattern


def _find_marker(text: str, marker: str, ignore_case: bool) -> int:
    """Index of the first marker occurrence, or -1."""
    if not marker:
        raise ValueError("marker must be a non-empty string")
    if not ignore_case:
        return text.find(marker)
    match = re.search(re.escape(marker), text, re.IGNORECASE)
    return match.start() if match else -1


def _match_to_float(match: re.Match[str]) -> float | None:
    """Convert a number match to a probability, or None when it is negative/out of range/not finite."""
    if match.group("sign") == "-":
        return None
    value = float(match.group("value"))
    if match.group("percent") is not None:
        value /= 100.0
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        return None
    return value


def parse_confidence(
    text: str, marker: str = CONFIDENCE_MARKER, *, ignore_case: bool = False
) -> float | None:
    """Parse the confidence stated after the first ``marker`` in ``text``.

    Args:
        text: a model response.
        marker: the confidence marker; matched case-sensitively unless ``ignore_case``.
        ignore_case: match the marker case-insensitively.

    Returns:
        The confidence in [0, 1] (``70%`` is read as 0.7), or ``None`` when there is no marker, the
        first marker is not followed by a number, or the value is negative or above 1.
    """
    start = _find_marker(text, marker, ignore_case)
    if start < 0:
        return None
    match = _value_pattern(marker, ignore_case).match(text, start)
    if match is None:
        return None
    return _match_to_float(match)


def format_confidence(p: float, precision: int = 2) -> str:
    """Format ``p`` with ``precision`` decimals, clamped to [0, 1] and rounded half-up.

    Args:
        p: a probability; values outside [0, 1] are clamped.
        precision: number of decimals (>= 0).

    Returns:
        e.g. ``"0.70"`` for ``(0.7, 2)``, ``"0.7"`` for ``(0.7, 1)``, ``"0.13"`` for ``(0.125, 2)``.

    Raises:
        ValueError: ``p`` is NaN or ``precision`` is negative.
    """
    if precision < 0:
        raise ValueError(f"precision must be >= 0, got {precision}")
    p = float(p)
    if math.isnan(p):
        raise ValueError("cannot format a NaN confidence")
    p = min(1.0, max(0.0, p))
    # repr gives the shortest decimal that round-trips, i.e. the value a human would write (0.285,
    # not 0.28499999...), so half-up applies to the decimal the caller meant.
    quantum = Decimal(1).scaleb(-precision)
    rounded = Decimal(repr(p)).quantize(quantum, rounding=ROUND_HALF_UP)
    return f"{rounded:.{precision}f}"


def rewrite_response_confidence(
    text: str,
    p: float,
    precision: int = 2,
    marker: str = CONFIDENCE_MARKER,
    separator: str = " ",
    *,
    ignore_case: bool = False,
) -> str:
    """Replace the response's confidence span with ``f"{marker} {format_confidence(p)}"``.

    The span runs from the first marker to the end of ``text``; the text before it (the answer,
    including whitespace right before the marker) is kept byte-for-byte. Without a marker the answer
    is kept with trailing whitespace stripped and ``separator + marker + " " + value`` is appended.

    Args:
        text: the student response.
        p: the student-grounded confidence.
        precision: decimals of the written value.
        marker: the confidence marker.
        separator: what joins the answer and an appended confidence when there was no marker.
        ignore_case: find the marker case-insensitively (the written marker is ``marker`` as given).

    Returns:
        The rewritten response; rewriting it again with the same ``p`` returns it unchanged.
    """
    confidence = f"{marker} {format_confidence(p, precision)}"
    start = _find_marker(text, marker, ignore_case)
    if start < 0:
        return text.rstrip() + separator + confidence
    return text[:start] + confidence


def strip_note_placeholder(context: str, note_placeholder: str = DEFAULT_NOTE_PLACEHOLDER) -> str:
    """Remove an unused note placeholder from a privileged context.

    A line holding only the placeholder (and spaces) is removed with its line break, so no blank line
    is left behind; any other occurrence is removed in place.

    Args:
        context: the teacher's privileged context.
        note_placeholder: the placeholder string, e.g. ``"{note}"``.

    Returns:
        ``context`` without the placeholder.
    """
    if not note_placeholder:
        raise ValueError("note_placeholder must be a non-empty string")
    whole_line = re.compile(r"(?m)^[ \t]*" + re.escape(note_placeholder) + r"[ \t]*(?:\r?\n|$)")
    return whole_line.sub("", context).replace(note_placeholder, "")


def rewrite_privileged_context(
    context: str,
    p: float,
    precision: int = 2,
    marker: str = CONFIDENCE_MARKER,
    note_template: str | None = DEFAULT_NOTE_TEMPLATE,
    note_placeholder: str = DEFAULT_NOTE_PLACEHOLDER,
    *,
    ignore_case: bool = False,
) -> str:
    """Ground every confidence in the teacher's privileged context on ``p`` and insert the note.

    Every ``marker`` followed by a number (``Confidence: 0.95``, ``Confidence: 95%`` ...) has that
    number replaced by ``format_confidence(p, precision)``; the marker and the spacing are kept.
    Then ``note_template.format(confidence=<formatted p>)`` replaces every ``note_placeholder`` in
    the context, or is appended on a new line when there is none. With ``note_template=None`` no
    note is added and an unused placeholder is stripped.

    Args:
        context: the teacher's privileged context (e.g. a demonstration plus instructions).
        p: the student-grounded confidence.
        precision: decimals of the written value.
        marker: the confidence marker.
        note_template: ``str.format`` template with a ``{confidence}`` field (literal braces must be
            doubled), or ``None`` for no note.
        note_placeholder: where to put the note if present in ``context``.
        ignore_case: match the marker case-insensitively.

    Returns:
        The rewritten context.
    """
    value = format_confidence(p, precision)
    pattern = _value_pattern(marker, ignore_case)
    # Only the number (and a "%") is swapped; a match object keeps the original marker spelling.
    context = pattern.sub(lambda m: m.group("marker") + m.group("space") + value, context)
    if note_template is None:
        return strip_note_placeholder(context, note_placeholder) if note_placeholder else context
    note = note_template.format(confidence=value)
    if note_placeholder and note_placeholder in context:
        return context.replace(note_placeholder, note)
    if not context or context.endswith("\n"):
        return context + note
    return context + "\n" + note


def empirical_confidence(correct: Sequence[bool]) -> float:
    """Student-grounded confidence: the fraction of the K graded samples that are correct.

    Args:
        correct: one grade per sample (bools, or 0/1).

    Returns:
        ``sum(correct) / len(correct)``.

    Raises:
        ValueError: no samples.
    """
    grades = [bool(c) for c in correct]
    if not grades:
        raise ValueError("empirical_confidence needs at least one graded sample")
    return sum(grades) / len(grades)
