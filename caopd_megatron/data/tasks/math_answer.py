"""Math with a numeric final answer: extraction from free text and equivalence by exact rational arithmetic.

Design decisions:
- The final answer is, in order of precedence, the content of the last complete ``\\boxed{...}`` (or
  ``\\fbox``; braces inside nested up to ``BOX_BRACE_DEPTH`` = 6 deep, an outer box wins over one inside
  it); else the rest of the line after the last "Answer:" / "answer is" (its first number when the whole
  rest is not a number); else the last number in the answer part (text before the confidence marker).
- Extraction is regex-only with possessive quantifiers (the box is a bounded-depth balanced-brace
  pattern, not a Python loop over braces: 1 MB of braces took 3 s that way), so grading is linear in the
  response length and runs at C speed. A candidate longer than ``MAX_ANSWER_CHARS`` is not
  compared at all (graded wrong): no real final answer is that long, and it bounds the normalisation and
  the str->int conversions (Python refuses > 4,300 digits and is quadratic below that).
- Values are ``fractions.Fraction`` built from regex-validated digit strings: integers (``1,234`` and
  ``1\\,234`` thousands separators), decimals, ``a/b``, ``\\frac{a}{b}`` / ``\\dfrac`` / ``\\tfrac`` /
  ``\\frac12``, a leading ``-`` (or U+2212), and percentages. Model text is never evaluated (no
  eval/exec/sympify); ``$``, ``\\(..\\)``, ``\\left``/``\\right``, ``\\!``, ``\\text{}`` wrappers and a
  leading ``x =`` are stripped before matching.
- A percentage ``p%`` stands for both ``p/100`` and ``p``: "50%" matches a reference of 0.5 or of 50
  ("what percent ...?" references are often written without the sign). Otherwise values must be equal
  exactly (0.333 is not 1/3).
- A reference that is not a number is compared as normalised text (spaces removed), so symbolic answers
  (``\\pi``, ``x+1``) still grade exact matches; an empty reference raises ValueError.
- Self-consistency's normaliser (``normalise_math``) maps a final answer to one canonical string: the exact
  value as ``n`` or ``n/d`` in lowest terms (so ``0.5``, ``1/2``, ``\\frac{1}{2}`` agree), a percentage
  as its value ``p/100`` (one form only: ``50%`` agrees with ``0.5``, not with ``50``), other text as the
  normalised text above.
"""
from __future__ import annotations

import re
from fractions import Fraction

from caopd_megatron.data.tasks.base import extract_answer, register_normaliser, register_task

__all__ = ["MAX_ANSWER_CHARS", "TASK_NAME", "extract_final_answer", "math_values", "normalise_math", "verify_math"]

TASK_NAME = "math"
MAX_ANSWER_CHARS = 300



def _balanced(depth: int) -> str:
    """Regex for text whose braces balance, nested at most ``depth`` deep; possessive, so it never backtracks."""
    inner = r"[^{}]*+"
    for _ in range(depth):
        inner = r"[^{}]*+(?:\{" + inner + r"\}[^{}]*+)*+"
    return inner


BOX_BRACE_DEPTH = 6
_BOX = re.compile(r"\\(?:boxed|fbox)[ \t]*+\{(?P<content>" + _balanced(BOX_BRACE_DEPTH) + r")\}")
_ANSWER_CUE = re.compile(r"(?i)\banswer(?:[ \t]++is\b|[ \t]*+[:：])")

# Unsigned decimal: thousands-grouped or plain digits, optional fraction part; or a bare ".5".
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})++|\d++)(?:\.\d*+)?+|\.\d++"
_SIGNED = r"[-+]?(?:" + _UNSIGNED + r")"
# A number token inside free text (for "the last number"): a LaTeX fraction, a/b, or a decimal, maybe with %.
_NUMBER_TOKEN = re.compile(
    r"-?\\[dt]?frac\{[ ]*+" + _SIGNED + r"[ ]*+\}\{[ ]*+" + _SIGNED + r"[ ]*+\}"
    r"|-?(?:" + _UNSIGNED + r")(?:[ ]*+/[ ]*+(?:" + _UNSIGNED + r"))?+(?:[ ]*+\\?%)?+"
)
# Whole-candidate grammars, matched after normalisation (no spaces left).
_FULL_FRAC = re.compile(r"(?P<sign>[-+]?)\\[dt]?frac\{(?P<num>" + _SIGNED + r")\}\{(?P<den>" + _SIGNED + r")\}")
_SHORT_FRAC = re.compile(r"(?P<sign>[-+]?)\\[dt]?frac(?P<num>\d)(?P<den>\d)")
_RATIO = re.compile(r"(?P<num>" + _SIGNED + r")/(?P<den>" + _SIGNED + r")")
_DECIMAL = re.compile(r"(?P<num>" + _SIGNED + r")(?P<percent>%)?")

_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\$|\\\(|\\\)|\\\[|\\\]|\^\\circ|°")
_TEXT_WRAPPER = re.compile(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}")
_WRAPPER = re.compile(r"\\(?:boxed|fbox)\{|\{")
_LEADING_VARIABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,3}=(?=[-+.\d\\])")


def _last_box(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (found left to right, non-overlapping); None without one."""
    last = None
    for last in _BOX.finditer(text):
        pass
    return None if last is None else last.group("content")


def _after_answer_cue(text: str) -> str | None:
    last = None
    for last in _ANSWER_CUE.finditer(text):
        pass
    if last is None:
        return None
    end = text.find("\n", last.end())
    return text[last.end() : end if end >= 0 else len(text)]


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_TOKEN.finditer(text):
        pass
    return None if last is None else last.group()


def extract_final_answer(response: str) -> str | None:
    """The final-answer text of ``response`` (boxed, else after "Answer:", else the last number), or None."""
    answer = extract_answer(response)
    boxed = _last_box(answer)
    if boxed is not None:
        return boxed
    cued = _after_answer_cue(answer)
    if cued is not None and cued.strip():
        if math_values(cued):
            return cued
        number = _NUMBER_TOKEN.search(cued)  # "Answer: 3 apples" -> the first number after the cue
        return number.group() if number is not None else cued
    return _last_number(answer)


def _normalise(text: str) -> str:
    text = text.strip().rstrip(".").replace("\u2212", "-").replace("{,}", ",").replace("\\%", "%")
    text = _TEXT_WRAPPER.sub(r"\1", text)
    text = _DROP.sub("", text)
    text = "".join(text.split())
    while len(text) > 2:  # bounded: the text is at most MAX_ANSWER_CHARS long
        wrapper = _WRAPPER.match(text) if text.endswith("}") else None
        if wrapper is not None:
            text = text[wrapper.end() : -1]
        elif text.startswith("(") and text.endswith(")"):
            text = text[1:-1]
        else:
            break
    return _LEADING_VARIABLE.sub("", text).rstrip(".")


def _number(literal: str) -> Fraction:
    return Fraction(literal.replace(",", ""))


def _signed(sign: str, value: Fraction) -> Fraction:
    return -value if sign == "-" else value


def math_values(text: str) -> frozenset[Fraction]:
    """The values ``text`` may stand for (two for a percentage), empty when it is not a number we read."""
    if len(text) > MAX_ANSWER_CHARS:
        return frozenset()
    text = _normalise(text)
    for pattern in (_FULL_FRAC, _SHORT_FRAC):
        match = pattern.fullmatch(text)
        if match:
            den = _number(match.group("den"))
            if den == 0:
                return frozenset()
            return frozenset({_signed(match.group("sign"), _number(match.group("num")) / den)})
    match = _RATIO.fullmatch(text)
    if match:
        den = _number(match.group("den"))
        return frozenset() if den == 0 else frozenset({_number(match.group("num")) / den})
    match = _DECIMAL.fullmatch(text)
    if match:
        value = _number(match.group("num"))
        return frozenset({value / 100, value}) if match.group("percent") else frozenset({value})
    return frozenset()


def verify_math(response: str, reference: str) -> bool:
    """True when the final answer of ``response`` equals ``reference`` (exact rational equality)."""
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"math reference must be a non-empty string, got {reference!r}")
    final = extract_final_answer(response)
    if final is None or len(final) > MAX_ANSWER_CHARS:
        return False
    gold = math_values(reference)
    if gold:
        return bool(gold & math_values(final))
    return _normalise(final) == _normalise(reference)


def canonical_value(value: Fraction) -> str:
    """``n`` or ``n/d`` in lowest terms (``Fraction`` keeps them reduced, the sign on the numerator)."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def normalise_math(response: str) -> str | None:
    """The canonical form of ``response``'s final answer (module docstring), None when it has none."""
    final = extract_final_answer(response)
    if final is None or len(final) > MAX_ANSWER_CHARS:
        return None
    values = math_values(final)
    if values:
        # A percentage reads as {p/100, p}: its canonical form is the smaller-magnitude p/100.
        return canonical_value(min(values, key=abs))
    return _normalise(final) or None


register_task(TASK_NAME, verify_math)
register_normaliser(TASK_NAME, normalise_math)
