"""Parse, format and rewrite the verbalised ``Confidence: <p>`` that ends a student response.

CaOPD replaces the student's self-reported confidence with the student-grounded confidence
``p = correct / K`` (the empirical accuracy over K graded samples of the same prompt), both in the
response the student is trained on and in the teacher's privileged context. The answer text is kept.

Design decisions:
- A confidence is introduced by the marker (``Confidence:``) or by a ``<confidence>`` tag (any case);
  whichever comes first is "the marker" for parsing, for the answer/confidence split of the graders
  (``data.tasks.base.extract_answer``) and for rewriting, so all three refer to the same place.
- FIRST marker by default (``occurrence="first"``): the answer part ends there, so the first value is
  the one the response committed to alongside its answer, and a later value cannot be appended to
  game the parse. ``occurrence="last"`` reads the final marker instead (for models that restate a
  revised confidence at the end); either way, if that marker carries no number the parse is ``None``.
- The marker is case-sensitive by default (``confidence: 0.7`` is not a confidence line), because the
  prompt asks for the exact marker and a case-insensitive match would also catch prose such as
  "my confidence: ..." mid-answer. ``ignore_case=True`` opts into a case-insensitive match.
- Number grammar after the marker: any horizontal whitespace, Unicode included (no-break, thin,
  ideographic spaces; never a line break), up to three opening ``* _ " ' ( [`` (markdown bold, quotes),
  an optional sign, then ``1``, ``1.``, ``0.7``, ``.7`` or a decimal comma ``0,7`` (a comma needs a
  digit after it), an optional exponent (``7e-1``), then either ``%`` (or full-width ``％``, or the word
  "percent"; spaces allowed before it) or a
  ratio ``/ 10``. Everything after is ignored. Conversion uses ``float`` only; nothing is evaluated.
- Percent rule: a ``%`` ALWAYS means "divide by 100" (``70%`` -> 0.7, ``0.7%`` -> 0.007). Without
  ``%`` the value is taken literally, so ``Confidence: 70`` is out of range and parses to ``None``;
  we never guess that a bare number > 1 was meant as a percentage. ``8/10`` is 0.8; ``x/0`` is out of range.
- Values outside [0, 1] after conversion, and any negative sign (even ``-0``), parse to ``None``: the
  response did not state a usable probability. ``parse_confidence_detail`` says which failure it was
  (``missing``, ``no_number``, ``out_of_range``) so reports count them apart instead of silently
  folding a stated-but-unusable number into "missing".
- Formatting rounds HALF-UP on the shortest decimal representation of the float (``repr``), via
  ``decimal``; e.g. 0.125 -> "0.13" and 0.285 -> "0.29". Python's ``round``/``%.2f`` would give
  "0.12" (banker's rounding) and "0.28" (binary representation), which makes k/K values round
  inconsistently. Values are clamped to [0, 1] first; NaN is rejected.
- Rewriting a response replaces the span from the first marker to the END of the text (including any
  trailing newline or later ``Confidence:`` lines) by ``"<marker> <p>"`` (``<confidence>p</confidence>``
  when the first marker was the tag); everything before the marker
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
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Sequence

from caopd_megatron.config.schema import CONFIDENCE_MARKER

CONFIDENCE_TAG = "<confidence>"
CONFIDENCE_TAG_CLOSE = "</confidence>"

DEFAULT_NOTE_TEMPLATE = "Note: the student's empirical confidence on this question is {confidence}."
DEFAULT_NOTE_PLACEHOLDER = "{note}"

# Whitespace that is not a line break (str.splitlines' boundaries): spaces, tabs, no-break and thin spaces.
_HSPACE = r"[^\S\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]"
_TAG_PATTERN = r"(?i:<confidence[ \t]*>)"

# Number grammar shared by parsing and context rewriting (see module docstring). Quantifiers next to
# one another are possessive (``*+``) so no input makes the matcher backtrack over a long run.
_NUMBER_PATTERN = (
    r"(?P<value>(?P<sign>[+-]?)(?:\d++(?:\.\d*+|,\d++)?|\.\d++)(?:[eE][+-]?\d++)?+)"
    r"(?:(?P<percent>" + _HSPACE + r"*+(?:%|\uff05|(?i:per[ ]?cent)\b))|(?P<ratio>" + _HSPACE + r"*+/" + _HSPACE + r"*+(?P<denominator>\d++)))?"
)

_OCCURRENCES = ("first", "last")
STATUS_OK, STATUS_MISSING, STATUS_NO_NUMBER, STATUS_OUT_OF_RANGE = "ok", "missing", "no_number", "out_of_range"

_marker_cache: dict[tuple[str, bool], re.Pattern[str]] = {}
_pattern_cache: dict[tuple[str, bool], re.Pattern[str]] = {}


@dataclass(frozen=True)
class ConfidenceParse:
    """The outcome of reading a response's confidence: ``value`` in [0, 1] when ``status == "ok"``."""

    value: float | None
    status: str  # "ok" | "missing" (no marker) | "no_number" | "out_of_range" (negative, > 1, not finite)


def _marker_regex(marker: str, ignore_case: bool) -> re.Pattern[str]:
    """The marker or the ``<confidence>`` tag, compiled once per (marker, case rule)."""
    key = (marker, ignore_case)
    pattern = _marker_cache.get(key)
    if pattern is None:
        if not isinstance(marker, str) or not marker:
            raise ValueError("marker must be a non-empty string")
        escaped = re.escape(marker)
        pattern = re.compile(
            ("(?i:" + escaped + ")" if ignore_case else escaped) + "|" + _TAG_PATTERN
        )
        _marker_cache[key] = pattern
    return pattern


def _value_pattern(marker: str, ignore_case: bool) -> re.Pattern[str]:
    """Compiled ``marker + spaces + number`` pattern, cached because rollouts call this per sample."""
    key = (marker, ignore_case)
    pattern = _pattern_cache.get(key)
    if pattern is None:
        pattern = re.compile(
            r"(?P<marker>" + _marker_regex(marker, ignore_case).pattern + r")"
            r"(?P<space>" + _HSPACE + r"*+[*_\"'(\[]{0,3}+" + _HSPACE + r"*+)" + _NUMBER_PATTERN
        )
        _pattern_cache[key] = pattern
    return pattern


def find_confidence_marker(
    text: str, marker: str = CONFIDENCE_MARKER, *, ignore_case: bool = False, occurrence: str = "first"
) -> re.Match[str] | None:
    """The first (or last) marker or ``<confidence>`` tag in ``text``, or None. Linear in ``len(text)``."""
    if occurrence not in _OCCURRENCES:
        raise ValueError(f"occurrence must be one of {', '.join(_OCCURRENCES)}, got {occurrence!r}")
    regex = _marker_regex(marker, ignore_case)
    if occurrence == "first":
        return regex.search(text)
    last = None
    for last in regex.finditer(text):
        pass
    return last


def _match_to_float(match: re.Match[str]) -> float | None:
    """Convert a number match to a probability, or None when it is negative/out of range/not finite."""
    if match.group("sign") == "-":
        return None
    value = float(match.group("value").replace(",", "."))
    if match.group("percent") is not None:
        value /= 100.0
    elif match.group("ratio") is not None:
        denominator = float(match.group("denominator"))
        value = value / denominator if denominator else math.inf
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        return None
    return value


def parse_confidence_detail(
    text: str, marker: str = CONFIDENCE_MARKER, *, ignore_case: bool = False, occurrence: str = "first"
) -> ConfidenceParse:
    """Parse the confidence after the first (or last) marker, saying why when there is none.

    Returns:
        ``ConfidenceParse(value, "ok")``, or ``value=None`` with status ``missing`` (no marker),
        ``no_number`` (the marker is not followed by a number) or ``out_of_range``.
    """
    found = find_confidence_marker(text, marker, ignore_case=ignore_case, occurrence=occurrence)
    if found is None:
        return ConfidenceParse(None, STATUS_MISSING)
    match = _value_pattern(marker, ignore_case).match(text, found.start())
    if match is None:
        return ConfidenceParse(None, STATUS_NO_NUMBER)
    value = _match_to_float(match)
    return ConfidenceParse(value, STATUS_OK if value is not None else STATUS_OUT_OF_RANGE)


def parse_confidence(
    text: str, marker: str = CONFIDENCE_MARKER, *, ignore_case: bool = False, occurrence: str = "first"
) -> float | None:
    """Parse the confidence stated after the first ``marker`` (or ``<confidence>`` tag) in ``text``.

    Args:
        text: a model response.
        marker: the confidence marker; matched case-sensitively unless ``ignore_case``.
        ignore_case: match the marker case-insensitively.
        occurrence: ``"first"`` (default) or ``"last"`` marker.

    Returns:
        The confidence in [0, 1] (``70%`` is read as 0.7, ``0,7`` and ``7/10`` as 0.7), or ``None`` when
        there is no marker, the marker is not followed by a number, or the value is negative or above 1.
    """
    return parse_confidence_detail(text, marker, ignore_case=ignore_case, occurrence=occurrence).value


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
    value = format_confidence(p, precision)
    found = find_confidence_marker(text, marker, ignore_case=ignore_case)
    if found is None:
        return text.rstrip() + separator + f"{marker} {value}"
    if found.group().startswith("<"):
        return text[: found.start()] + f"{CONFIDENCE_TAG}{value}{CONFIDENCE_TAG_CLOSE}"
    return text[: found.start()] + f"{marker} {value}"


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
