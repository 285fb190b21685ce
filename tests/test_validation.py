"""Start-up validation: config ranges, prompt rows (family, reference, length), phase files (types, vocabulary,
emptiness). In process where possible; through the `caopd` CLI for the one-line error, exit 2, no traceback."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from caopd_megatron.calibration.revise import DistillExample, RolloutRecord
from caopd_megatron.config.loader import ConfigError, load_config
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.config.validate import RANGES, out_of_range
from caopd_megatron.data.prompts import PromptDataError, PromptRecord
from caopd_megatron.data.records_io import RecordFileError, read_records, write_records
from caopd_megatron.data.row_checks import check_prompt_rows
from caopd_megatron.data.tokenizer import build_synthetic_tokenizer
from test_cli_e2e import TINY, caopd

# ---- config ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, needle", [
    ("rollout.temperature=-1", "key 'rollout.temperature': -1.0 is out of range (must be > 0)"),
    ("rollout.top_p=1.5", "key 'rollout.top_p': 1.5 is out of range (must be > 0 and <= 1)"),
    ("rollout.top_p=0", "(must be > 0 and <= 1)"),
    ("optim.lr=-1", "key 'optim.lr': -1.0 is out of range (must be >= 0)"),
    ("teacher.ema_rate=5", "key 'teacher.ema_rate': 5.0 is out of range (must be >= 0 and <= 1)"),
    ("checkpoint.keep_last=-1", "key 'checkpoint.keep_last': -1 is out of range (must be >= 0)"),
    ("rollout.samples_per_prompt=0", "key 'rollout.samples_per_prompt': 0 is out of range (must be >= 1)"),
    ("rollout.prompts_per_step=0", "key 'rollout.prompts_per_step': 0 is out of range (must be >= 1)"),
    ("task.min_digits=7", "task.min_digits=7 exceeds task.max_digits=6"),
    ("teacher.model.hidden_size=0", "key 'teacher.model.hidden_size': 0 is out of range"),
])
def test_out_of_range_values_stop_the_loader(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config([], [override])
    assert needle in str(info.value)


def test_every_range_rule_names_a_real_numeric_key():
    """A typo in the table would silently check nothing: every key must exist and hold a number by default."""
    cfg = CaOPDConfig()
    cfg.teacher.model = dataclasses.replace(cfg.model)
    for key in RANGES:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        field_type = type(node)
        assert node is None or field_type in (int, float), key
    assert out_of_range(load_config()) == []


def test_range_error_through_the_cli_is_one_line():
    start = time.time()
    proc = caopd("run", "rollout.temperature=-1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("caopd run: error: key 'rollout.temperature': -1.0 is out of range "
                                   "(must be > 0)")
    assert time.time() - start < 120  # before any model is built


# ---- prompt rows ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


def _check(rows, tokenizer, on_bad_row="fatal", context=64):
    return check_prompt_rows(rows, source="p.jsonl", render=lambda r: [("student prompt", f"Q {r.question} =")],
                             encode=tokenizer.encode, context=context, response_tokens=9, on_bad_row=on_bad_row)


GOOD = PromptRecord(id="a", question="1 2 3", reference="6", task="digit_sum")


@pytest.mark.parametrize("bad, needle", [
    (PromptRecord(id="b", question="1 2", reference="3", task="poetry"), "row 'b': unknown task family: unknown task 'poetry'"),
    (PromptRecord(id="c", question="call", reference="not json", task="tooluse"),
     "row 'c': the 'tooluse' verifier rejects its reference: tooluse reference is not valid JSON"),
    (PromptRecord(id="d", question=" ".join(["1"] * 60), reference="0", task="digit_sum"),
     "row 'd': the student prompt is 62 tokens after templating; with 9 for the response it exceeds "
     "model.max_position_embeddings=64"),
])
def test_bad_rows_are_fatal_by_default_and_counted_under_skip(bad, needle, tokenizer):
    with pytest.raises(PromptDataError) as info:
        _check([GOOD, bad], tokenizer)
    assert needle in str(info.value) and "\n" not in str(info.value)
    kept, dropped = _check([GOOD, bad], tokenizer, on_bad_row="skip")
    assert kept == [GOOD] and len(dropped) == 1 and needle in dropped[0]


def test_a_megabyte_question_is_refused_in_a_line_without_tokenizing(tokenizer):
    huge = PromptRecord(id="big", question="7 " * 500_000, reference="0", task="digit_sum")
    calls = []

    def encode(text):
        calls.append(len(text))
        return tokenizer.encode(text)

    with pytest.raises(PromptDataError, match=r"row 'big': the student prompt is 1,000,004 characters"):
        check_prompt_rows([huge], source="p.jsonl", render=lambda r: [("student prompt", f"Q {r.question} =")],
                          encode=encode, context=256, response_tokens=9, on_bad_row="fatal")
    assert calls == []


@pytest.mark.slow
def test_cli_refuses_a_megabyte_question_in_one_line(tmp_path):
    rows = [{"id": "ok", "question": "1 2", "reference": "3", "task": "digit_sum"},
            {"id": "big", "question": "7 " * 500_000, "reference": "0", "task": "digit_sum"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = caopd("run", *TINY, f"data.train_prompts={path}", f"run.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"caopd run: error: {path}: row 'big': the student prompt is 1,000,004 characters")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_prints_skipped_counts_for_eval_rows(tmp_path):
    rows = [{"id": f"e{i}", "question": "1 2", "reference": "3", "task": "digit_sum"} for i in range(3)]
    rows.append({"id": "x", "question": "1 2", "reference": "3", "task": "poetry"})
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    proc = caopd("evaluate", *TINY, "logging.level=INFO", "data.on_bad_row=skip", f"data.eval_prompts={path}",
                 f"run.output_dir={tmp_path / 'run'}")
    assert "eval prompts" in proc.stderr
    assert "3 row(s) used, 2 skipped (1 unreadable, 1 failing checks)" in proc.stderr
    assert json.loads((tmp_path / "run" / "eval" / "eval_metrics.json").read_text())["n"] == 3


# ---- phase files ---------------------------------------------------------------------------------------


def _example(**over) -> DistillExample:
    base = dict(prompt_id="a", sample_index=0, student_prompt_ids=[1, 2], teacher_prompt_ids=[3, 4],
                response_ids=[5, 6], correct=True, stated_confidence=None, empirical_confidence=0.5, text="x")
    return DistillExample(**{**base, **over})


def test_phase_file_types_are_checked(tmp_path):
    path = tmp_path / "revised.jsonl"
    write_records(path, [_example()])
    row = json.loads(path.read_text())
    assert read_records(path, DistillExample, vocab_size=10) == [_example()]
    for field, value, needle in [("response_ids", "56", "field 'response_ids' must be list[int], got a string"),
                                 ("correct", 1, "field 'correct' must be bool, got an integer"),
                                 ("empirical_confidence", "0.5", "field 'empirical_confidence' must be float, got a string"),
                                 ("student_prompt_ids", [1, True], "field 'student_prompt_ids' must be list[int], got a list")]:
        path.write_text(json.dumps({**row, field: value}) + "\n")
        with pytest.raises(RecordFileError, match=rf"revised\.jsonl:1: {re.escape(needle)}"):
            read_records(path, DistillExample)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    write_records(path, [RolloutRecord(prompt_id="a", sample_index=0, prompt_ids=[1, 2], response_ids=[3, 50_000],
                                       text="x")])
    with pytest.raises(RecordFileError, match=r"rollouts\.jsonl:1: field 'response_ids' holds token id 50000, "
                                              r"outside this run's vocabulary \(0\.\.99\)"):
        read_records(path, RolloutRecord, vocab_size=100)
    path.write_text(path.read_text().replace("[1, 2]", "[-1, 2]"))
    with pytest.raises(RecordFileError, match="token id -1"):
        read_records(path, RolloutRecord, vocab_size=100_000)


def test_an_empty_phase_file_is_an_error(tmp_path):
    path = tmp_path / "revised.jsonl"
    path.write_text("\n")
    with pytest.raises(RecordFileError, match=r"revised\.jsonl: no DistillExample rows"):
        read_records(path, DistillExample, allow_empty=False)


@pytest.mark.slow
def test_cli_distill_on_an_empty_revised_file_is_one_line(tmp_path):
    path = tmp_path / "revised.jsonl"
    path.write_text("")
    proc = caopd("distill", "--examples", str(path), *TINY, f"run.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"caopd distill: error: {path}: no DistillExample rows (an empty " \
                                                   f"phase file is an error, not a no-op step)"
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()
