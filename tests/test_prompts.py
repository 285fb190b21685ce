"""Prompt schema, JSONL loader/writer, and the eval-set adapters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from caopd_megatron.data.prompts import (
    LoadReport,
    PromptDataError,
    PromptRecord,
    load_chemistry_mcq,
    load_prompts,
    load_tooluse,
    write_prompts,
)

from real_eval import real_eval_file as _eval_file

GOOD = {"id": "a", "question": "1 2", "reference": "3", "task": "digit_sum"}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    records = [
        PromptRecord(id="x1", question="2 3", reference="5", task="digit_sum"),
        PromptRecord(
            id="x2",
            question="Ünïcode — question?",
            reference="B",
            task="chemistry_mcq",
            demonstration="<answer>B</answer> Confidence: 1.0",
            meta={"difficulty": 3, "tags": ["a", "b"], "nested": {"k": None}},
        ),
    ]
    path = tmp_path / "sub" / "prompts.jsonl"
    write_prompts(records, path)
    loaded, report = load_prompts(path)
    assert loaded == records
    assert (report.n_ok, report.n_skipped, report.errors) == (2, 0, [])
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert "meta" not in first and "demonstration" not in first  # empty optionals are omitted
    assert not list(path.parent.glob("*.tmp"))


def test_unknown_fields_go_to_meta_and_blank_lines_are_ignored(tmp_path):
    path = _write_lines(
        tmp_path / "p.jsonl",
        [
            "",
            json.dumps({**GOOD, "source": "synthetic", "meta": {"n_digits": 2}}),
            "   ",
            json.dumps({**GOOD, "id": "b"}),
        ],
    )
    records, report = load_prompts(path)
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].meta == {"n_digits": 2, "source": "synthetic"}
    assert records[0].demonstration is None
    assert report.n_ok == 2


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got array"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "reference"}), "missing required field(s): reference"),
        (json.dumps({**GOOD, "id": 7}), "field 'id' must be a string, got number"),
        (json.dumps({**GOOD, "question": "  "}), "field 'question' must not be empty"),
        (json.dumps({**GOOD, "demonstration": 1}), "'demonstration' must be a string or null"),
        (json.dumps({**GOOD, "meta": [1]}), "field 'meta' must be an object"),
        (json.dumps({**GOOD, "x": 1, "meta": {"x": 2}}), "'x'"),
        (json.dumps({**GOOD, "id": "first"}), "duplicate id 'first' (first seen on line 1)"),
    ],
)
def test_fatal_errors_name_file_and_line(tmp_path, line, message):
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps({**GOOD, "id": "first"}), "", line])
    with pytest.raises(PromptDataError) as info:
        load_prompts(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text


def test_invalid_utf8_is_a_line_error(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(PromptDataError, match=r"bytes\.jsonl:2: invalid UTF-8"):
        load_prompts(path)


def test_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    records, _ = load_prompts(path)
    assert records[0].id == "a"


def test_skip_mode_reports_and_keeps_good_lines(tmp_path):
    path = _write_lines(
        tmp_path / "mixed.jsonl",
        [json.dumps(GOOD), "oops", json.dumps({**GOOD, "id": "b"}), json.dumps(GOOD), json.dumps({"id": "c"})],
    )
    records, report = load_prompts(path, on_error="skip")
    assert [r.id for r in records] == ["a", "b"]
    assert isinstance(report, LoadReport)
    assert (report.n_ok, report.n_skipped) == (2, 3)
    assert [e.split(": ")[0] for e in report.errors] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "duplicate id 'a'" in report.errors[1]
    assert "2 record(s) loaded, 3 skipped" in report.summary()


def test_missing_empty_and_bad_arguments(tmp_path):
    with pytest.raises(PromptDataError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(PromptDataError, match="not a file"):
        load_prompts(tmp_path)
    empty = _write_lines(tmp_path / "empty.jsonl", ["", " "])
    with pytest.raises(PromptDataError, match="no prompt records"):
        load_prompts(empty)
    all_bad = _write_lines(tmp_path / "allbad.jsonl", ["x"])
    with pytest.raises(PromptDataError, match="1 line\\(s\\) skipped"):
        load_prompts(all_bad, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        load_prompts(all_bad, on_error="ignore")  # type: ignore[arg-type]


def test_record_validation_and_meta_copy():
    meta = {"k": 1}
    rec = PromptRecord(id="a", question="q", reference="r", task="t", meta=meta)
    meta["k"] = 2
    assert rec.meta == {"k": 1}
    with pytest.raises(PromptDataError, match="field 'task' must be a string"):
        PromptRecord(id="a", question="q", reference="r", task=None)  # type: ignore[arg-type]
    assert issubclass(PromptDataError, ValueError)


def test_write_rejects_duplicates_and_non_json_meta(tmp_path):
    rec = PromptRecord(id="a", question="q", reference="r", task="t")
    with pytest.raises(PromptDataError, match="duplicate id 'a'"):
        write_prompts([rec, rec], tmp_path / "d.jsonl")
    with pytest.raises(PromptDataError, match="non-JSON meta"):
        bad_meta = PromptRecord(id="b", question="q", reference="r", task="t", meta={"s": {1, 2}})
        write_prompts([bad_meta], tmp_path / "m.jsonl")
    assert not (tmp_path / "d.jsonl").exists() and not (tmp_path / "m.jsonl").exists()


# --- eval-set adapters -----------------------------------------------------------------------------


def test_chemistry_adapter_on_real_data(tmp_path):
    path = _eval_file("chemistry_mcq_eval.jsonl")
    records = load_chemistry_mcq(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) == len(raw) == 507
    assert len({r.id for r in records}) == 507
    for rec, item in zip(records, raw):
        assert rec.task == "chemistry_mcq"
        assert rec.reference == item["answer"]
        system, user = item["prompt"][0]["content"].strip(), item["prompt"][1]["content"].strip()
        assert rec.question == f"{system}\n\n{user}"
        assert rec.meta["messages"] == item["prompt"]
    # The adapted records survive our own JSONL round trip.
    write_prompts(records, tmp_path / "chem.jsonl")
    assert load_prompts(tmp_path / "chem.jsonl")[0] == records


def test_tooluse_adapter_on_real_data():
    path = _eval_file("tooluse_eval.jsonl")
    records = load_tooluse(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) == 97
    for rec, item in zip(records, raw):
        assert rec.task == "tooluse"
        assert rec.question == item["prompt"]
        assert json.loads(rec.reference) == item["golden_answer"]
        assert rec.meta["name"] == item["name"] and rec.meta["instruction"] == item["instruction"]
        assert "golden_answer" not in rec.meta and "prompt" not in rec.meta


def test_adapters_reject_bad_records(tmp_path):
    chem = _write_lines(
        tmp_path / "chem.jsonl",
        [json.dumps({"prompt": [{"role": "user", "content": "Q?"}], "answer": "A"}),
         json.dumps({"prompt": [{"role": "user", "content": "Q?"}], "answer": "E"})],
    )
    with pytest.raises(PromptDataError, match=r"chem\.jsonl:2: field 'answer' must be one of A, B, C, D"):
        load_chemistry_mcq(chem)
    system_only = {"prompt": [{"role": "system", "content": "S"}], "answer": "A"}
    no_user = _write_lines(tmp_path / "nouser.jsonl", [json.dumps(system_only)])
    with pytest.raises(PromptDataError, match="no user message"):
        load_chemistry_mcq(no_user)
    tool = _write_lines(
        tmp_path / "tool.jsonl",
        [json.dumps({"prompt": "P", "golden_answer": [{"Action": "x", "Action_Input": "{broken"}]})],
    )
    with pytest.raises(PromptDataError, match=r"tool\.jsonl:1: field 'golden_answer': .*not valid JSON"):
        load_tooluse(tool)
    with pytest.raises(PromptDataError, match="prompt file not found"):
        load_tooluse(tmp_path / "absent.jsonl")
