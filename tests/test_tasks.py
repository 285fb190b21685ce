"""Task families and verifiers: synthetic digit-sum, crafted responses, and the real public eval sets."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from caopd_megatron.data.prompts import load_chemistry_mcq, load_tooluse
from caopd_megatron.data.tasks import base
from caopd_megatron.data.tasks.base import UnknownTaskError, extract_answer, get_verifier, known_tasks, register_task
from caopd_megatron.data.tasks.chemistry_mcq import extract_choice, verify_chemistry_mcq
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records, verify_digit_sum
from caopd_megatron.data.tasks.tooluse import (
    ToolCall,
    format_tool_calls,
    json_equal,
    parse_golden_calls,
    parse_tool_calls,
    verify_tooluse,
)

from real_eval import real_eval_file as _eval_file


# --- base ------------------------------------------------------------------------------------------


def test_extract_answer_splits_at_first_marker():
    assert extract_answer("  7 Confidence: 0.9") == "7"
    assert extract_answer("7\nconfidence: 0.9") == "7\nconfidence: 0.9"  # case-sensitive, like parse_confidence
    assert extract_answer("7\nconfidence: 0.9", ignore_case=True) == "7"
    assert extract_answer("a Confidence: 0.1 b Confidence: 0.2") == "a"
    assert extract_answer(" no marker here ") == "no marker here"
    assert extract_answer("x ## 0.3", marker="##") == "x"
    with pytest.raises(ValueError, match="marker"):
        extract_answer("x", marker="")


def test_registry_lists_builtins_and_rejects_unknown():
    assert {"digit_sum", "chemistry_mcq", "tooluse"} <= set(known_tasks())
    assert get_verifier("digit_sum") is verify_digit_sum
    with pytest.raises(UnknownTaskError) as info:
        get_verifier("no_such_task")
    message = str(info.value)
    assert "no_such_task" in message and "digit_sum" in message and "tooluse" in message


def test_register_task_conflicts(monkeypatch):
    known_tasks()  # load built-ins before isolating the registry
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register_task("custom_test_task")
    def exact(response: str, reference: str) -> bool:
        return extract_answer(response) == reference

    assert get_verifier("custom_test_task")("ok Confidence: 1.0", "ok")
    register_task("custom_test_task", exact)  # same object again: fine
    with pytest.raises(ValueError, match="already has a verifier"):
        register_task("custom_test_task", lambda r, ref: True)
    register_task("custom_test_task", lambda r, ref: True, overwrite=True)
    assert get_verifier("custom_test_task")("anything", "x")
    with pytest.raises(ValueError, match="non-empty"):
        register_task("  ", exact)


# --- digit sum -------------------------------------------------------------------------------------


def test_digit_sum_is_deterministic_and_correct():
    a = make_digit_sum_records(50, seed=3)
    assert a == make_digit_sum_records(50, seed=3)
    assert [r.question for r in a] != [r.question for r in make_digit_sum_records(50, seed=4)]
    assert len({r.id for r in a}) == 50 and a[0].id == "ds-0"
    for rec in a:
        digits = [int(tok) for tok in rec.question.split(" ")]
        assert len(digits) == rec.meta["n_digits"]
        assert rec.reference == str(sum(digits) % 10)
        assert rec.task == "digit_sum"
        assert rec.demonstration == f"{rec.reference} Confidence: 1.0"
        assert verify_digit_sum(rec.demonstration, rec.reference)


def test_digit_sum_difficulty_spread():
    recs = make_digit_sum_records(100, seed=0, min_digits=2, max_digits=6, id_prefix="x")
    counts = Counter(r.meta["n_digits"] for r in recs)
    assert counts == {2: 20, 3: 20, 4: 20, 5: 20, 6: 20}
    # Every in-order batch of 5 spans all difficulties.
    assert {r.meta["n_digits"] for r in recs[:5]} == {2, 3, 4, 5, 6}
    assert all(r.id.startswith("x-") for r in recs)


def test_digit_sum_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_digits"):
        make_digit_sum_records(5, seed=0, min_digits=4, max_digits=2)
    with pytest.raises(ValueError, match="n must be"):
        make_digit_sum_records(-1, seed=0)
    with pytest.raises(TypeError, match="seed"):
        make_digit_sum_records(3, seed="a")  # type: ignore[arg-type]
    assert make_digit_sum_records(0, seed=0) == []


@pytest.mark.parametrize(
    "response,expected",
    [
        ("7 Confidence: 0.9", True),
        ("7", True),
        (" 7 \n", True),
        ("7 confidence: 0.2", False),  # not a confidence marker, so the answer part is the whole text
        ("17 Confidence: 0.9", False),
        ("7. Confidence: 0.9", False),
        ("Confidence: 0.9 7", False),
        ("", False),
        ("3 Confidence: 1.0", False),
    ],
)
def test_digit_sum_verifier(response, expected):
    assert verify_digit_sum(response, "7") is expected


def test_digit_sum_bad_reference_raises():
    with pytest.raises(ValueError, match="single digit"):
        verify_digit_sum("7", "12")


# --- chemistry MCQ ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,choice",
    [
        ("<reasoning>\nbecause\n</reasoning>\n<answer>\nB\n</answer>\nConfidence: 0.8", "B"),
        ("<ANSWER> b </ANSWER>", "B"),
        ("<answer>A</answer> wait, no. <answer>C</answer>", "C"),  # last tag wins
        ("<answer>(D)</answer>", "D"),
        ("<answer>A.</answer>", "A"),
        ("<answer>A: CCOC(=O)C</answer>", None),  # option text, not a letter
        ("<answer>A or B</answer>", None),
        ("<answer>E</answer>", None),
        ("C Confidence: 0.5", "C"),  # lone letter fallback
        ("The answer is C", None),
        ("<reasoning>x</reasoning><answer>\nD\nConfidence: 0.6", "D"),  # unclosed final tag
        ("<answer>A</answer> then <answer>B", "B"),  # the later, unclosed tag is the final choice
        ("<answer>A</answer> Confidence: 0.9 <answer>B</answer>", "A"),  # after the marker is ignored
        ("<answer><answer>B</answer>", "B"),
        ("", None),
    ],
)
def test_chemistry_extract_choice(response, choice):
    assert extract_choice(response) == choice


def test_chemistry_verifier_compares_with_gold():
    response = "<reasoning>...</reasoning>\n<answer>\nB\n</answer>\nConfidence: 0.7"
    assert verify_chemistry_mcq(response, "B")
    assert verify_chemistry_mcq(response, " b ")
    assert not verify_chemistry_mcq(response, "A")
    assert not verify_chemistry_mcq("<answer>", "A")
    with pytest.raises(ValueError, match="A, B, C, D"):
        verify_chemistry_mcq(response, "E")


# --- tool use --------------------------------------------------------------------------------------


def _ref(*calls: tuple[str, dict]) -> str:
    return json.dumps([{"Action": name, "Action_Input": json.dumps(args)} for name, args in calls])


TWO_CALLS = _ref(("search", {"q": "axolotl", "page": 1}), ("getFacts", {}))


def test_tooluse_parses_prompt_format():
    response = (
        "Thought: I need to search first.\n"
        "Action: search\n"
        'Action Input: {"page": 1, "q": "axolotl"}\n'
        "Observation: results...\n"
        "Thought: now the facts\n"
        "Action: getFacts\n"
        "Action Input: {}\n"
        "Confidence: 0.8"
    )
    assert parse_tool_calls(response) == [ToolCall("search", {"page": 1, "q": "axolotl"}), ToolCall("getFacts", {})]
    assert verify_tooluse(response, TWO_CALLS)  # key order does not matter


def test_tooluse_multiline_and_fenced_json():
    response = (
        "Action: search\nAction Input:\n```json\n{\n  \"q\": \"axolotl\",\n  \"page\": 1.0\n}\n```\n"
        "Action: getFacts\nAction Input: {}"
    )
    assert verify_tooluse(response, TWO_CALLS)  # 1 and 1.0 are the same JSON number


def test_tooluse_text_inside_json_is_not_a_new_call():
    ref = _ref(("note", {"text": "line\nAction: fake"}))
    response = 'Action: note\nAction Input: {"text": "line\\nAction: fake"}'
    assert verify_tooluse(response, ref)


@pytest.mark.parametrize(
    "response",
    [
        'Action: search\nAction Input: {"q": "axolotl", "page": 2}\nAction: getFacts\nAction Input: {}',  # value
        'Action: Search\nAction Input: {"q": "axolotl", "page": 1}\nAction: getFacts\nAction Input: {}',  # name
        'Action: search\nAction Input: {"q": "axolotl", "page": 1}',  # too few calls
        'Action: search\nAction Input: {"q": "axolotl", "page": 1}\nAction: getFacts\nAction Input: {}\n'
        "Action: getFacts\nAction Input: {}",  # too many
        'Action: getFacts\nAction Input: {}\nAction: search\nAction Input: {"q": "axolotl", "page": 1}',  # order
        'Action: search\nAction Input: {"q": "axolotl", "page": 1, "x": 0}\nAction: getFacts\nAction Input: {}',
    ],
)
def test_tooluse_wrong_calls_are_incorrect(response):
    assert not verify_tooluse(response, TWO_CALLS)


@pytest.mark.parametrize(
    "response",
    [
        "Action: search\nAction Input: {'q': 'axolotl'}",  # Python literal, not JSON
        'Action: search\nAction Input: {"q": "axolotl"',  # truncated
        "Action: search\nThought: forgot the input",
        'Action Input: {"q": "axolotl"}',  # input without an action
        "Action:\nAction Input: {}",  # empty tool name
        "Action: search\nAction: getFacts\nAction Input: {}",
        "Action: search\nAction Input: __import__('os').system('echo hi')",
        "Action: search\nAction Input: " + "[" * 100_000,
        "",
        "I cannot help with that.",
    ],
)
def test_tooluse_malformed_is_incorrect_not_an_error(response):
    assert parse_tool_calls(response) is None or parse_tool_calls(response) == []
    assert verify_tooluse(response, TWO_CALLS) is False


def test_json_equal_is_type_aware():
    assert json_equal({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]})
    assert not json_equal({"flag": True}, {"flag": 1})
    assert not json_equal({"n": 0}, {"n": False})
    assert not json_equal({"n": None}, {"n": 0})
    assert not json_equal([1, 2], [2, 1])
    assert not json_equal({"a": "1"}, {"a": 1})


def test_tooluse_bad_reference_raises():
    with pytest.raises(ValueError, match="not valid JSON"):
        verify_tooluse("Action: x\nAction Input: {}", "not json")
    with pytest.raises(ValueError, match="Action_Input is not valid JSON"):
        parse_golden_calls(json.dumps([{"Action": "x", "Action_Input": "{bad"}]))
    with pytest.raises(ValueError, match="'Action' and 'Action_Input'"):
        parse_golden_calls(json.dumps([{"Action": "x"}]))


def test_format_tool_calls_round_trips():
    assert verify_tooluse(format_tool_calls(TWO_CALLS) + "\nConfidence: 0.5", TWO_CALLS)


# --- the real public eval sets ---------------------------------------------------------------------


def test_real_chemistry_records_verify_with_gold_letter_only():
    records = load_chemistry_mcq(_eval_file("chemistry_mcq_eval.jsonl"))
    assert len(records) == 507
    for rec in records:
        verify = get_verifier(rec.task)
        assert rec.reference in ("A", "B", "C", "D")
        for letter in "ABCD":
            response = (
                f"<reasoning>\nThinking about {rec.id}.\n</reasoning>\n<answer>\n{letter}\n</answer>\nConfidence: 0.6"
            )
            assert verify(response, rec.reference) is (letter == rec.reference), (rec.id, letter)


def _render_react(calls: list[dict]) -> str:
    """The golden calls written the way the prompts ask, independently of format_tool_calls."""
    parts = []
    for call in calls:
        args = json.loads(call["Action_Input"])
        parts.append(
            f"Thought: I should use {call['Action']}.\nAction: {call['Action']}\n"
            f"Action Input: {json.dumps(args, indent=2)}\nObservation: (tool output)"
        )
    return "\n".join(parts) + "\nConfidence: 0.7"


def _perturb(calls: list[dict]) -> list[dict]:
    calls = [dict(c) for c in calls]
    last = calls[-1]
    args = json.loads(last["Action_Input"])
    if isinstance(args, dict) and args:
        key = sorted(args)[0]
        args[key] = "__perturbed__" if args[key] != "__perturbed__" else "__other__"
        last["Action_Input"] = json.dumps(args)
    else:
        last["Action"] = last["Action"] + "X"
    return calls


def test_real_tooluse_golden_answers_verify_and_perturbations_fail():
    path = _eval_file("tooluse_eval.jsonl")
    records = load_tooluse(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) == len(raw) == 97
    for rec, item in zip(records, raw):
        verify = get_verifier(rec.task)
        golden = item["golden_answer"]
        assert "Action Input:" in rec.question  # the format the responses follow
        assert verify(_render_react(golden), rec.reference), rec.id
        assert verify(format_tool_calls(rec.reference), rec.reference), rec.id
        assert not verify(_render_react(_perturb(golden)), rec.reference), rec.id
        assert not verify(_render_react(golden[:-1]) if len(golden) > 1 else "Final Answer: none", rec.reference)
