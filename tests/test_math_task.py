"""The math task family: final-answer extraction and exact rational equivalence, on hand-made cases."""
from __future__ import annotations

import builtins
from fractions import Fraction

import pytest

from caopd_megatron.data.tasks.base import get_verifier
from caopd_megatron.data.tasks.math_answer import extract_final_answer, math_values, verify_math


@pytest.mark.parametrize(
    "response, final",
    [
        ("so the area is \\boxed{12}. Confidence: 0.9", "12"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # nested braces
        ("first \\boxed{1}, corrected: \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\boxed{5}}", "\\boxed{5}"),  # the outer box closes last
        ("\\boxed {x^{2}}", "x^{2}"),
        ("\\boxed{7", None),  # unclosed box, no answer cue, no other number... except the 7 itself
        ("Work: 3 + 4 = 7\nAnswer: 7 apples", "7"),
        ("Answer: 3 apples and 4 pears", "3"),  # the first number after the cue
        ("The answer is 0.75.", " 0.75."),
        ("I get 3, then 4, finally 10", "10"),  # the last number
        ("Total: 1,234,567 and that's it", "1,234,567"),
        ("no numbers here", None),
        ("12 Confidence: 0.8", "12"),  # the confidence is not the last number
        ("12 <confidence>0.8</confidence>", "12"),
    ],
)
def test_extract_final_answer(response, final):
    if final is None and response == "\\boxed{7":
        final = "7"  # the unclosed box falls through to the last number
    assert extract_final_answer(response) == final


@pytest.mark.parametrize(
    "response, reference",
    [
        ("\\boxed{42}", "42"),
        ("\\boxed{42.0}", "42"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{3}{4}}", "3/4"),
        ("\\boxed{\\tfrac{6}{8}}", "\\frac{3}{4}"),
        ("\\boxed{\\frac34}", "0.75"),
        ("\\boxed{-\\frac{1}{2}}", "-0.5"),
        ("\\boxed{\\frac{-1}{2}}", "-1/2"),
        ("\\boxed{\u22123}", "-3"),
        ("$\\boxed{1,000}$", "1000"),
        ("\\boxed{1\\,000}", "1000"),
        ("\\boxed{1{,}000}", "1000"),
        ("\\boxed{50\\%}", "0.5"),
        ("Answer: 50%", "50"),
        ("Answer: 0.5", "50%"),
        ("Answer: $x = 5$", "5"),
        ("Answer: \\( \\frac{1}{3} \\)", "1/3"),
        ("\\boxed{\\text{12}}", "12"),
        ("the answer is 12.", "12"),
        ("we find 6/8", "3/4"),
        ("\\boxed{\\left(\\frac{2}{4}\\right)}", "1/2"),
        ("\\boxed{\\pi}", "\\pi"),  # a symbolic reference compares as normalised text
        ("\\boxed{x + 1}", "x+1"),
        ("\\boxed{.5}", "1/2"),
    ],
)
def test_equivalent_forms_are_correct(response, reference):
    assert verify_math(response, reference)
    assert get_verifier("math")(response + " Confidence: 0.7", reference)


@pytest.mark.parametrize(
    "response, reference",
    [
        ("\\boxed{0.333}", "1/3"),  # exact, not approximate
        ("\\boxed{41}", "42"),
        ("\\boxed{-42}", "42"),
        ("\\boxed{\\frac{3}{0}}", "3"),
        ("\\boxed{1,00}", "100"),  # not a thousands grouping
        ("Answer: 0.5", "5"),  # a percentage's two readings do not reach 5
        ("42 Confidence: 0.9 \\boxed{41}", "41"),  # text after the marker is not graded
        ("\\boxed{12} and then 42", "42"),  # the box wins over a later number
        ("\\boxed{\\pi + 1}", "\\pi"),
        ("", "1"),
        ("\\boxed{" + "9" * 5000 + "}", "9" * 5000),  # longer than any real answer: not compared
    ],
)
def test_wrong_or_unreadable_answers_are_incorrect(response, reference):
    assert not verify_math(response, reference)


def test_values_are_exact_fractions():
    assert math_values("\\frac{1}{3}") == {Fraction(1, 3)}
    assert math_values("12.5%") == {Fraction(1, 8), Fraction(25, 2)}
    assert math_values("0.1") == {Fraction(1, 10)}  # not the binary float 0.1000000000000000055...
    assert math_values("hello") == frozenset()


def test_bad_reference_raises():
    with pytest.raises(ValueError, match="math reference"):
        verify_math("\\boxed{1}", "  ")


def test_model_text_is_never_evaluated(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model text reached eval/exec")

    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, refuse)
    assert not verify_math("\\boxed{__import__('os').system('echo pwned')}", "0")
    assert not verify_math("Answer: 2**10", "1024")
    assert verify_math("\\boxed{1024}", "1024")
