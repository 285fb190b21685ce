"""Self-consistency confidence (calibration.self_consistency) and the per-family answer normalisers.

References are hand-written: normalised forms of hand-made responses, and p values counted by hand over
hand-built K = 4 rollouts (anchored on the record's demonstration, or on the modal answer without one).
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from caopd_megatron.calibration.revise import revise
from caopd_megatron.calibration.self_consistency import agreement, self_consistency_confidence
from caopd_megatron.config.schema import CalibrationConfig, DataConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.records import RolloutRecord
from caopd_megatron.data.tasks.base import get_normaliser, normalise_free_text
from caopd_megatron.data.tasks.chemistry_mcq import extract_choice
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records, normalise_digit_sum
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
