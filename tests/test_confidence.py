"""Tests for parsing, formatting and rewriting the verbalised confidence."""
import pytest

from caopd_megatron.data.confidence import (
    CONFIDENCE_MARKER,
    empirical_confidence,
    format_confidence,
    parse_confidence,
    parse_confidence_detail,
    rewrite_privileged_context,
    rewrite_response_confidence,
    strip_note_placeholder,
)

NOTE = "Note: the student's empirical confidence on this question is {}."


# ---------------------------------------------------------------- parse_confidence
@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 4.\nConfidence: 0.7", 0.7),
        ("Confidence: .7", 0.7),
        ("Confidence: .5", 0.5),
        ("Confidence: 1", 1.0),
        ("Confidence: 0", 0.0),
        ("Confidence: 1.0", 1.0),
        ("Confidence: 1.", 1.0),
        ("Confidence:0.25", 0.25),
        ("Confidence: \t 0.25", 0.25),
        ("Confidence: 70%", 0.7),
        ("Confidence: 70 %", 0.7),
        ("Confidence: 100%", 1.0),
        ("Confidence: 0%", 0.0),
        ("Confidence: 0.5%", 0.005),  # "%" always divides by 100
        ("Confidence: 7e-1", 0.7),
        ("Confidence: +0.3", 0.3),
        ("Confidence: 0.8 (fairly sure, I checked twice)", 0.8),
        ("Confidence: 0.8.", 0.8),
        ("Confidence: 0.9\nConfidence: 0.1", 0.9),  # the first one wins
        ("答案是 4。 Confidence: 0.6 ✓ 😀", 0.6),
        ("Confidence:  0.45\n", 0.45),
    ],
)
def test_parse_valid(text, expected):
    assert parse_confidence(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 4.",  # no marker
        "",
        "Confidence:",  # marker with no number
        "Confidence: high",
        "Confidence: high\nConfidence: 0.8",  # only the first marker is read
        "Confidence: 1.5",
        "Confidence: 150%",
        "Confidence: 70",  # a bare number > 1 is not guessed to be a percentage
        "Confidence: -0.3",
        "Confidence: -0",
        "Confidence: 1e400",
        "Confidence:\n0.7",  # the number must be on the marker's line
        "confidence: 0.7",  # case-sensitive by default
    ],
)
def test_parse_invalid(text):
    assert parse_confidence(text) is None


def test_parse_ignore_case_and_custom_marker():
    assert parse_confidence("confidence: 0.7", ignore_case=True) == pytest.approx(0.7)
    assert parse_confidence("CONF= 40%", marker="CONF=") == pytest.approx(0.4)
    assert parse_confidence("a+b Conf(x): 0.2", marker="Conf(x):") == pytest.approx(0.2)  # regex-escaped


# ---------------------------------------------------------------- format_confidence
@pytest.mark.parametrize(
    "p, precision, expected",
    [
        (0.7, 2, "0.70"),
        (0.7, 1, "0.7"),
        (0.7, 3, "0.700"),
        (0.125, 2, "0.13"),  # half-up, not banker's
        (0.375, 2, "0.38"),
        (0.285, 2, "0.29"),  # half-up on the decimal, not on 0.28499999... in binary
        (0.05, 1, "0.1"),
        (0.25, 1, "0.3"),
        (0.0625, 3, "0.063"),
        (1 / 3, 2, "0.33"),
        (2 / 3, 3, "0.667"),
        (0.0, 2, "0.00"),
        (1.0, 2, "1.00"),
        (1.7, 2, "1.00"),  # clamped
        (-0.2, 2, "0.00"),
        (-0.0, 2, "0.00"),
        (0.996, 2, "1.00"),
        (0.4, 0, "0"),
        (0.5, 0, "1"),
    ],
)
def test_format(p, precision, expected):
    assert format_confidence(p, precision) == expected


def test_format_rejects_nan_and_negative_precision():
    with pytest.raises(ValueError):
        format_confidence(float("nan"))
    with pytest.raises(ValueError):
        format_confidence(0.5, -1)


@pytest.mark.parametrize("k, K", [(k, K) for K in (1, 2, 4, 8, 16) for k in range(K + 1)])
def test_format_roundtrips_through_parse(k, K):
    value = format_confidence(k / K, 3)
    assert parse_confidence(f"Confidence: {value}") == pytest.approx(k / K, abs=5e-4 + 1e-9)  # half a unit in the last place


# ---------------------------------------------------------------- rewrite_response_confidence
def test_rewrite_keeps_answer_exactly():
    answer = "  Let x = 2.\n\nThen  x² = 4 → **4**\t\n"
    text = answer + "Confidence: 0.95"
    out = rewrite_response_confidence(text, 0.5)
    assert out == answer + "Confidence: 0.50"
    assert out.startswith(answer)


def test_rewrite_replaces_everything_from_first_marker():
    text = "Answer: 3\nConfidence: 90%\nConfidence: 0.2\nmore text\n"
    assert rewrite_response_confidence(text, 0.25) == "Answer: 3\nConfidence: 0.25"


def test_rewrite_marker_without_number_or_with_trailing_text():
    assert rewrite_response_confidence("A\nConfidence:", 1.0) == "A\nConfidence: 1.00"
    assert rewrite_response_confidence("A\nConfidence: high!", 0.0) == "A\nConfidence: 0.00"
    assert rewrite_response_confidence("A Confidence: 0.9 because...", 0.3) == "A Confidence: 0.30"


def test_rewrite_appends_when_no_confidence():
    assert rewrite_response_confidence("The answer is 4.  \n", 0.75) == "The answer is 4. Confidence: 0.75"
    assert rewrite_response_confidence("x", 0.75, separator="\n") == "x\nConfidence: 0.75"
    assert rewrite_response_confidence("", 0.5) == " Confidence: 0.50"


@pytest.mark.parametrize("precision, expected", [(1, "0.1"), (3, "0.125")])
def test_rewrite_precision(precision, expected):
    assert rewrite_response_confidence("a Confidence: 1", 0.125, precision) == f"a Confidence: {expected}"


def test_rewrite_unicode_around_marker():
    text = "Ответ: 42 ✓\n🙂Confidence: 0.99 🎉"
    assert rewrite_response_confidence(text, 0.4) == "Ответ: 42 ✓\n🙂Confidence: 0.40"


@pytest.mark.parametrize(
    "text",
    ["Answer 4\nConfidence: 0.9", "Answer 4", "Answer 4\n\n", "A\nConfidence: x\nConfidence: 1", "", "Confidence:"],
)
@pytest.mark.parametrize("separator", [" ", "\n"])
def test_rewrite_idempotent(text, separator):
    once = rewrite_response_confidence(text, 0.625, separator=separator)
    assert rewrite_response_confidence(once, 0.625, separator=separator) == once
    assert parse_confidence(once) == pytest.approx(0.63)


def test_rewrite_custom_marker_and_ignore_case():
    assert rewrite_response_confidence("a\nP = 0.9", 0.5, marker="P =") == "a\nP = 0.50"
    assert rewrite_response_confidence("a confidence: 0.9", 0.5, ignore_case=True) == "a Confidence: 0.50"
    assert rewrite_response_confidence("a confidence: 0.9", 0.5) == "a confidence: 0.9 Confidence: 0.50"


# ---------------------------------------------------------------- rewrite_privileged_context
def test_context_without_confidence_appends_note():
    ctx = "Reference solution: 2 + 2 = 4."
    assert rewrite_privileged_context(ctx, 0.5) == ctx + "\n" + NOTE.format("0.50")
    # A trailing newline is reused rather than doubled.
    assert rewrite_privileged_context(ctx + "\n", 0.5) == ctx + "\n" + NOTE.format("0.50")


def test_context_one_confidence_with_placeholder():
    ctx = "Demo: x = 4\nConfidence: 0.95\n{note}\nNow answer."
    out = rewrite_privileged_context(ctx, 0.25)
    assert out == "Demo: x = 4\nConfidence: 0.25\n" + NOTE.format("0.25") + "\nNow answer."


def test_context_two_confidences_every_value_replaced():
    ctx = "Ex1 ... Confidence: 0.95\nEx2 ... Confidence:  95 %, sure.\nConfidence: <your confidence>"
    out = rewrite_privileged_context(ctx, 1 / 3, note_template=None)
    # Marker and spacing kept, only the number (and "%") replaced; the template marker is untouched.
    assert out == "Ex1 ... Confidence: 0.33\nEx2 ... Confidence:  0.33, sure.\nConfidence: <your confidence>"


def test_context_out_of_range_values_are_replaced_too():
    out = rewrite_privileged_context("Confidence: 150% | Confidence: -2", 0.1, precision=1, note_template=None)
    assert out == "Confidence: 0.1 | Confidence: 0.1"


def test_context_note_none_strips_placeholder():
    ctx = "Demo\nConfidence: 0.9\n{note}\nQ"
    assert rewrite_privileged_context(ctx, 0.5, note_template=None) == "Demo\nConfidence: 0.50\nQ"


def test_context_custom_template_and_placeholder():
    ctx = "<<N>> Demo Confidence: 80%"
    out = rewrite_privileged_context(ctx, 0.8, note_template="[p={confidence}]", note_placeholder="<<N>>")
    assert out == "[p=0.80] Demo Confidence: 0.80"


def test_context_note_is_not_rewritten_by_the_value_pass():
    out = rewrite_privileged_context("Confidence: 0.9", 0.5, note_template="Confidence: {confidence} (grounded)")
    assert out == "Confidence: 0.50\nConfidence: 0.50 (grounded)"


def test_strip_note_placeholder():
    assert strip_note_placeholder("a\n{note}\nb") == "a\nb"
    assert strip_note_placeholder("a\n  {note}  \r\nb") == "a\nb"
    assert strip_note_placeholder("a {note} b") == "a  b"
    assert strip_note_placeholder("a\n{note}") == "a\n"
    assert strip_note_placeholder("no placeholder") == "no placeholder"
    assert strip_note_placeholder("x <N>", "<N>") == "x "
    with pytest.raises(ValueError):
        strip_note_placeholder("x", "")


# ---------------------------------------------------------------- empirical_confidence
def test_empirical_confidence():
    assert empirical_confidence([True, False, True, True]) == 0.75
    assert empirical_confidence([False] * 8) == 0.0
    assert empirical_confidence([1, 1]) == 1.0
    assert empirical_confidence(x for x in [True, False]) == 0.5
    with pytest.raises(ValueError):
        empirical_confidence([])


def test_marker_constant():
    assert CONFIDENCE_MARKER == "Confidence:"


# ---------------------------------------------------------------- the remaining cases (Unicode, comma, tags, which marker)
@pytest.mark.parametrize(
    "text, expected",
    [
        ("Confidence:\u00a00.8", 0.8),  # no-break space
        ("Confidence:\u202f0.8", 0.8),  # narrow no-break space
        ("Confidence:\u2009\u30000.35", 0.35),  # thin + ideographic space
        ("Confidence: 0.8\u00a0%", 0.008),  # "%" always divides, whatever the space before it
        ("Confidence: 80\u00a0%", 0.8),
        ("Confidence: 80 percent", 0.8),
        ("Confidence: 80 Per cent sure", 0.8),
        ("Confidence: \uff18\uff10\uff05", 0.8),  # full-width digits and percent sign
        ("Confidence: 80 percentile", None),  # not the word "percent"
        ("Confidence: 0,8", 0.8),  # decimal comma
        ("Confidence: 0,85.", 0.85),
        ("Confidence: 1,0", 1.0),
        ("Confidence: 1, I am sure", 1.0),  # a comma with no digit after it ends the number
        ("Confidence: 8/10", 0.8),
        ("Confidence: 3 / 4", 0.75),
        ("Confidence: **0.8**", 0.8),  # markdown bold
        ('Confidence: "0.6"', 0.6),
        ("Confidence: (0.6)", 0.6),
        ("<answer>B</answer><confidence>0.7</confidence>", 0.7),
        ("B <Confidence> 0.4 </Confidence>", 0.4),  # tag in any case
        ("<confidence>0.2</confidence> Confidence: 0.9", 0.2),  # whichever comes first
    ],
)
def test_parse_remaining_cases(text, expected):
    assert parse_confidence(text) == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "text, status",
    [
        ("no marker at all", "missing"),
        ("Confidence: high", "no_number"),
        ("Confidence:\n0.8", "no_number"),  # a line break is not a space after the marker
        ("Confidence:\u20280.8", "no_number"),  # nor is a Unicode line separator
        ("Confidence: 70", "out_of_range"),
        ("Confidence: 3/0", "out_of_range"),
        ("Confidence: -0,5", "out_of_range"),
        ("<confidence></confidence>", "no_number"),
        ("Confidence: 0,7", "ok"),
    ],
)
def test_parse_detail_says_why(text, status):
    detail = parse_confidence_detail(text)
    assert detail.status == status
    assert (detail.value is not None) == (status == "ok")


def test_no_number_a_person_reads_becomes_missing():
    # Each of these states a probability a person reads at once; none may parse to None (scored 0.0).
    readable = ["Confidence:\u00a00.9", "Confidence: 0,9", "<confidence>0.9</confidence>", "Confidence: 9/10",
                "Confidence: **0.9**", "Confidence:\u3000０.9".replace("０", "0")]
    for text in readable:
        assert parse_confidence(text) == pytest.approx(0.9), text


def test_first_or_last_marker():
    text = "4 Confidence: 0.9\nOn reflection, 5. Confidence: 0.3"
    assert parse_confidence(text) == pytest.approx(0.9)
    assert parse_confidence(text, occurrence="first") == pytest.approx(0.9)
    assert parse_confidence(text, occurrence="last") == pytest.approx(0.3)
    assert parse_confidence("Confidence: 0.9 then Confidence: sure", occurrence="last") is None
    with pytest.raises(ValueError, match="occurrence"):
        parse_confidence(text, occurrence="middle")


def test_tag_split_and_rewrite_keep_the_form():
    from caopd_megatron.data.tasks.base import extract_answer

    assert extract_answer("7 <confidence>0.8</confidence>") == "7"
    assert rewrite_response_confidence("7 <confidence>0.8</confidence>", 0.25) == "7 <confidence>0.25</confidence>"
    assert rewrite_response_confidence("7 Confidence:\u00a00,8", 0.5) == "7 Confidence: 0.50"
    ctx = "Demo <confidence>0.9</confidence> and Confidence:\u00a00,95 and Confidence: 9/10."
    assert rewrite_privileged_context(ctx, 0.5, note_template=None) == (
        "Demo <confidence>0.50</confidence> and Confidence:\u00a00.50 and Confidence: 0.50."
    )


@pytest.mark.parametrize("text", [
    "Confidence:" + " " * (1 << 20) + "x",
    "Confidence: " + "9" * (1 << 20) + ",",
    "Confidence: 0," + "9" * (1 << 20) + "/" + " " * (1 << 20),
    "<confidence" + " " * (1 << 20),
    "Confidence: " + "*" * (1 << 20),
])
def test_parse_is_linear_on_hostile_text(text):
    import time

    start = time.process_time()  # CPU time: robust to a loaded machine, still minutes for a quadratic parse
    parse_confidence_detail(text)
    rewrite_privileged_context(text * 2, 0.5, note_template=None)
    assert time.process_time() - start < 3.0
