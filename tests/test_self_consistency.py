"""Self-consistency confidence (calibration.self_consistency) and the per-family answer normalisers.

References are hand-written: normalised forms of hand-made responses, and p values counted by hand over
hand-built K = 4 rollouts (anchored on the record's demonstration, or on the modal answer without one).
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from caopd_megatron.calibration.revise import revise
from caopd_megatron.calibration.self_consistency import agreement, anchor_answer, self_consistency_confidence
from caopd_megatron.config.schema import CalibrationConfig, DataConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.records import RolloutRecord
from caopd_megatron.data.tasks.base import get_normaliser, normalise_free_text
from caopd_megatron.data.tasks.chemistry_mcq import extract_choice
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records, normalise_digit_sum
from caopd_megatron.data.tasks.math_answer import normalise_math, verify_math
from caopd_megatron.data.tasks.tooluse import normalise_tooluse
from caopd_megatron.data.tokenizer import build_synthetic_tokenizer


def test_family_normalisers():
    assert normalise_digit_sum("7 Confidence: 0.4") == "7"
    assert normalise_digit_sum("07 Confidence: 0.4") is None and normalise_digit_sum("") is None
    assert get_normaliser("digit_sum") is normalise_digit_sum
    assert get_normaliser("chemistry_mcq") is extract_choice
    assert extract_choice("<answer> (b) </answer> Confidence: 0.9") == "B"
    a = normalise_tooluse('Thought: x\nAction: get\nAction Input: {"b": 1, "a": [true]}\nConfidence: 0.5')
    b = normalise_tooluse('Action: get\nAction Input: {"a": [true],  "b": 1}')
    assert a == b == json.dumps([{"action": "get", "input": {"a": [True], "b": 1}}], sort_keys=True,
                                separators=(",", ":"))
    assert normalise_tooluse("Action: get") is None
    # A family without a normaliser (or without a verifier) compares the answer part, whitespace collapsed.
    assert get_normaliser("no_such_family") is normalise_free_text
    assert normalise_free_text("  Paris   is it \n Confidence: 1") == "Paris is it"


def test_anchored_and_modal_agreement():
    assert agreement(["3", "3", None, "4"], "3") == [True, True, False, False]
    assert self_consistency_confidence(["3", "3", None, "4"], "3") == 0.5
    assert self_consistency_confidence(["4", "4", "4", "3"], None) == 0.75  # modal answer "4"
    assert self_consistency_confidence([None, None], None) == 0.0
    with pytest.raises(ValueError):
        self_consistency_confidence([], "1")


def _rollouts(record, texts):
    return [RolloutRecord(prompt_id=record.id, sample_index=i, prompt_ids=[1], response_ids=[2], text=t)
            for i, t in enumerate(texts)]


def test_revise_with_self_consistency_counts_agreement_with_the_anchor():
    tok = build_synthetic_tokenizer()
    rec = make_digit_sum_records(1, seed=0, min_digits=2, max_digits=2)[0]
    ref = rec.reference
    other = str((int(ref) + 1) % 10)
    texts = [f"{ref} Confidence: 1.0", f"{other} Confidence: 1.0", f"{ref} Confidence: 0.5", "x Confidence: 0.5"]
    calib = CalibrationConfig(confidence_source="self_consistency")
    examples = revise(_rollouts(rec, texts), {rec.id: rec}, tok, DataConfig(), calib)
    assert [e.empirical_confidence for e in examples] == [0.5] * 4  # 2 of 4 agree with the demonstration "ref"
    assert [e.correct for e in examples] == [True, False, True, False]  # the verifier's verdicts are kept
    # A wrong demonstration moves the anchor: p now counts agreement with the wrong answer.
    wrong_demo = dataclasses.replace(rec, demonstration=f"{other} Confidence: 1.0")
    examples = revise(_rollouts(wrong_demo, texts), {rec.id: wrong_demo}, tok, DataConfig(), calib)
    assert examples[0].empirical_confidence == 0.25
    # The verifier's p on the same rollouts, for contrast.
    verified = revise(_rollouts(rec, texts), {rec.id: rec}, tok, DataConfig(), CalibrationConfig())
    assert verified[0].empirical_confidence == 0.5


def test_without_a_verifier_or_anchor_the_modal_share_is_used():
    tok = build_synthetic_tokenizer()
    # No verifier for this family and a demonstration whose answer part is empty: no anchor.
    rec = PromptRecord(id="open-1", question="1 2", reference="unused", task="open_question",
                       demonstration="Confidence: 1.0")
    texts = ["4 Confidence: 0.3", "4 Confidence: 0.3", "5 Confidence: 0.3", "4 Confidence: 0.3"]
    examples = revise(_rollouts(rec, texts), {rec.id: rec}, tok, DataConfig(),
                      CalibrationConfig(confidence_source="self_consistency"))
    assert [e.empirical_confidence for e in examples] == [0.75] * 4
    assert [e.correct for e in examples] == [True, True, False, True]  # agreement stands in for the verdict


# Hand-made sets of math responses that state the same value in different notations ...
MATH_AGREEING = [
    ["\\boxed{\\frac{1}{2}} Confidence: 0.8", "The answer is 0.5", "Answer: 1/2", "so \\boxed{x = \\dfrac12}.", "$\\boxed{50\\%}$",
     "\\boxed{0.50}", "we get \\boxed{\\left(\\frac{2}{4}\\right)}"],
    ["\\boxed{-3}", "Answer: \u22123", "-3.0", "x=-3", "\\boxed{-\\frac{6}{2}}", "\\boxed{\\text{-3}}"],
    ["\\boxed{1,234}", "Answer: 1234", "\\boxed{1\\,234.0}", "the total is 1234 apples"],
    ["\\boxed{\\pi}", "Answer: \\pi", "\\boxed{ \\pi }"],  # symbolic: equal as normalised text
]
# ... and pairs that must not agree (a value that is close, or a percentage read the other way).
MATH_DISAGREEING = [("\\boxed{1/3}", "0.333"), ("Answer: 2", "Answer: -2"), ("\\boxed{50\\%}", "Answer: 50"),
                    ("\\boxed{\\pi}", "3.14159"), ("\\boxed{10}", "\\boxed{100}"), ("\\boxed{x+1}", "\\boxed{x-1}")]


def test_math_normaliser_makes_equivalent_answers_agree():
    assert get_normaliser("math") is normalise_math
    for group in MATH_AGREEING:
        forms = {normalise_math(r) for r in group}
        assert len(forms) == 1 and None not in forms, (group, forms)
    assert normalise_math("\\boxed{0.5}") == "1/2" and normalise_math("Answer: -6/4") == "-3/2"
    for a, b in MATH_DISAGREEING:
        assert normalise_math(a) != normalise_math(b), (a, b)
    assert normalise_math("no number here") is None or normalise_math("no number here") != normalise_math("4")
    assert normalise_math("") is None and normalise_math("Confidence: 0.9") is None
    assert normalise_math("\\boxed{" + "9" * 400 + "}") is None  # longer than any real answer: not compared


def test_math_normaliser_agrees_with_the_verifier_on_numbers():
    # Within an agreeing group the verifier accepts every member against every other's final answer
    # (the percentage excepted: it also reads 50% as 50, which the normaliser does not).
    for group in MATH_AGREEING[1:3]:
        for response in group:
            for other in group:
                assert verify_math(response, normalise_math(other)), (response, other)


def test_self_consistency_on_math_is_anchored_on_the_demonstration_value():
    rec = PromptRecord(id="m-1", question="1/4 + 1/4?", reference="1/2", task="math",
                       demonstration="\\boxed{\\frac{1}{2}} Confidence: 1.0")
    anchor = anchor_answer(rec, rec.demonstration)
    answers = [normalise_math(r) for r in
               ("0.5 Confidence: 0.9", "\\boxed{2/4}", "Answer: 0.25", "I am not sure", "\\boxed{1/2} Confidence: 1")]
    assert anchor == "1/2"
    assert self_consistency_confidence(answers, anchor) == 3 / 5
    # Without an anchor the modal value is the one written three ways.
    assert self_consistency_confidence(answers, None) == 3 / 5
