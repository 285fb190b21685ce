"""Checks ``calibration/revise.py`` (grading + confidence rewriting into DistillExamples) and
``data/records_io.py`` (phase files).

Reference: hand-built RolloutRecords on digit-sum prompts (K=4 per prompt, known right/wrong answers, some
without a stated confidence), with every expected text, confidence string and token id list written out
by hand from the synthetic tokenizer's word -> id map (``token_to_id``), not from the code under test.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from caopd_megatron.calibration.revise import revise, student_prompt_text
from caopd_megatron.config.schema import CalibrationConfig, DataConfig
from caopd_megatron.data.records import DistillExample, RolloutRecord
from caopd_megatron.data.records_io import RecordFileError, read_records, write_records
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records
from caopd_megatron.data.tokenizer import build_synthetic_tokenizer

K = 4
TOK = build_synthetic_tokenizer(extra_words=["0.75", "0.25", "0.00"])  # two-decimal confidences for precision=2
EOS = TOK.eos_id


def ids(text: str) -> list[int]:
    """Word -> id by hand (the synthetic tokenizer is word-level), independent of ``encode``."""
    out = [TOK.token_to_id(w) for w in text.split()]
    assert None not in out, text
    return out


def wrong(ref: str, k: int = 1) -> str:
    return str((int(ref) + k) % 10)


@pytest.fixture(scope="module")
def setup():
    recs = make_digit_sum_records(3, seed=0, min_digits=3, max_digits=3)
    a, b, c = recs
    # A: a demonstration with a non-default confidence (so "original" and "rewritten" differ);
    # B: no demonstration (the default "<ref> Confidence: 1.0" is used); C: the task's own demonstration.
    a = dataclasses.replace(a, demonstration=f"{a.reference} Confidence: 0.6")
    b = dataclasses.replace(b, demonstration=None)
    prompts = {r.id: r for r in (a, b, c)}
    ra, rb, rc = a.reference, b.reference, c.reference
    # (prompt, response text, correct, stated confidence)
    table = [
        (a, f"{ra} Confidence: 0.9", True, 0.9),
        (a, f"{ra} Confidence: 0.4", True, 0.4),
        (a, f"{wrong(ra)} Confidence: 1.0", False, 1.0),
        (a, f"{ra}", True, None),  # no confidence stated
        (b, f"{wrong(rb)} Confidence: 0.9", False, 0.9),
        (b, f"{wrong(rb, 2)}", False, None),
        (b, f"{wrong(rb)} Confidence: 0.5", False, 0.5),
        (b, f"{wrong(rb, 3)} Confidence: 1.0", False, 1.0),
        (c, f"{rc} Confidence: 0.2 Confidence: 0.9", True, 0.2),  # the first marker counts
        (c, f"{wrong(rc)} Confidence: 0.7", False, 0.7),
        (c, f"{wrong(rc)}", False, None),
        (c, f"{wrong(rc, 5)} Confidence: 0.1", False, 0.1),
    ]
    # Interleave the prompts' samples (A0 B0 C0 A1 ...): p must be computed per prompt, not per position.
    order = [i + K * j for i in range(K) for j in range(3)]
    rollouts, expect = [], []
    for n, idx in enumerate(order):
        rec, text, correct, stated = table[idx]
        finished = idx != 1  # one truncated sample without EOS
        sampled = ids(text) + ([EOS] if finished else [])
        rollouts.append(RolloutRecord(prompt_id=rec.id, sample_index=idx % K, prompt_ids=ids(f"Q {rec.question} ="),
                                      response_ids=sampled, text=text, logprobs=[-0.5] * len(sampled), seed=7,
                                      finished=finished))
        expect.append((rec, text, correct, stated))
    return prompts, rollouts, expect, (a, b, c)


P1 = {"A": "0.8", "B": "0.0", "C": "0.3"}  # 3/4 -> 0.75 -> "0.8" (half-up), 0/4, 1/4 -> 0.25 -> "0.3"
P2 = {"A": "0.75", "B": "0.00", "C": "0.25"}
P_EXACT = {"A": 0.75, "B": 0.0, "C": 0.25}


def label(rec, abc) -> str:
    return "ABC"[[r.id for r in abc].index(rec.id)]


@pytest.mark.parametrize("precision, pstr", [(1, P1), (2, P2)])
def test_rewrite_on(setup, precision, pstr):
    prompts, rollouts, expect, abc = setup
    calib = CalibrationConfig(rewrite=True, precision=precision)
    out = revise(rollouts, prompts, TOK, DataConfig(), calib)
    assert len(out) == len(rollouts)
    for ex, r, (rec, text, correct, stated) in zip(out, rollouts, expect):
        lab = label(rec, abc)
        p = pstr[lab]
        answer = text.split(" Confidence:")[0]
        assert isinstance(ex, DistillExample)
        assert (ex.prompt_id, ex.sample_index) == (rec.id, r.sample_index)
        assert ex.correct is correct
        assert ex.stated_confidence == stated
        assert ex.empirical_confidence == P_EXACT[lab]
        assert ex.text == f"{answer} Confidence: {p}"  # answer kept, confidence replaced/appended
        assert ex.response_ids == ids(f"{answer} Confidence: {p}") + [EOS]  # EOS appended (also when truncated)
        assert ex.student_prompt_ids == r.prompt_ids == ids(f"Q {rec.question} =")
        assert ex.teacher_prompt_ids == ids(f"Reference: {rec.reference} Confidence: {p} Note: {p} Q {rec.question} =")
    # Every response of a prompt ends with the same confidence.
    for lab_rec in abc:
        tails = {tuple(e.response_ids[-3:]) for e in out if e.prompt_id == lab_rec.id}
        assert len(tails) == 1


def test_rewrite_on_without_note(setup):
    prompts, rollouts, expect, abc = setup
    out = revise(rollouts, prompts, TOK, DataConfig(), CalibrationConfig(rewrite=True, note_template=None))
    for ex, (rec, *_rest) in zip(out, expect):
        p = P1[label(rec, abc)]
        assert ex.teacher_prompt_ids == ids(f"Reference: {rec.reference} Confidence: {p} Q {rec.question} =")
        assert TOK.token_to_id("Note:") not in ex.teacher_prompt_ids


def test_rewrite_off_keeps_sampled_ids_and_original_demonstration(setup):
    prompts, rollouts, expect, abc = setup
    out = revise(rollouts, prompts, TOK, DataConfig(), CalibrationConfig(rewrite=False))
    a, b, c = abc
    demo_conf = {a.id: "0.6", b.id: "1.0", c.id: "1.0"}  # A's own, B's default, C's task demonstration
    for ex, r, (rec, text, correct, stated) in zip(out, rollouts, expect):
        assert ex.response_ids == r.response_ids and ex.response_ids is not r.response_ids
        assert ex.text == text
        assert ex.correct is correct and ex.stated_confidence == stated
        assert ex.empirical_confidence == P_EXACT[label(rec, abc)]  # still computed and reported
        assert ex.student_prompt_ids == r.prompt_ids
        assert ex.teacher_prompt_ids == ids(
            f"Reference: {rec.reference} Confidence: {demo_conf[rec.id]} Q {rec.question} =")
        assert TOK.token_to_id("Note:") not in ex.teacher_prompt_ids
    truncated = [ex for ex, r in zip(out, rollouts) if not r.finished]
    assert len(truncated) == 1 and truncated[0].response_ids[-1] != EOS


def test_student_prompt_text_uses_the_template(setup):
    _, _, _, (a, _, _) = setup
    assert student_prompt_text(a, DataConfig()) == f"Q {a.question} ="
    assert student_prompt_text(a, DataConfig(student_template="{question} ?")) == f"{a.question} ?"


def test_unknown_prompt_id_raises(setup):
    prompts, rollouts, _, _ = setup
    bad = dataclasses.replace(rollouts[0], prompt_id="no-such-id")
    with pytest.raises(KeyError, match="no-such-id"):
        revise(rollouts[:3] + [bad], prompts, TOK, DataConfig(), CalibrationConfig())


# ---------------------------------------------------------------- records_io
def test_records_round_trip(setup, tmp_path):
    prompts, rollouts, _, _ = setup
    examples = revise(rollouts, prompts, TOK, DataConfig(), CalibrationConfig())
    p1 = write_records(tmp_path / "phase" / "rollouts.jsonl", rollouts)
    p2 = write_records(tmp_path / "phase" / "revised.jsonl", examples)
    assert read_records(p1, RolloutRecord) == rollouts
    back = read_records(p2, DistillExample)
    assert back == examples
    assert any(e.stated_confidence is None for e in back)
    assert sorted(x.name for x in (tmp_path / "phase").iterdir()) == ["revised.jsonl", "rollouts.jsonl"]
    assert len(p1.read_text().splitlines()) == len(rollouts)
    assert read_records(write_records(tmp_path / "empty.jsonl", []), RolloutRecord) == []


def test_malformed_line_names_file_and_line(setup, tmp_path):
    _, rollouts, _, _ = setup
    good = json.dumps(dataclasses.asdict(rollouts[0]))
    path = tmp_path / "r.jsonl"
    path.write_text(good + "\n\n{oops\n")
    with pytest.raises(RecordFileError) as info:
        read_records(path, RolloutRecord)
    assert f"{path}:3:" in str(info.value) and "not valid JSON" in str(info.value)

    extra = dict(dataclasses.asdict(rollouts[0]), bogus=1)
    path.write_text(good + "\n" + json.dumps(extra) + "\n")
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2: unknown field\(s\) \['bogus'\]"):
        read_records(path, RolloutRecord)

    missing = dataclasses.asdict(rollouts[0])
    del missing["prompt_ids"]
    path.write_text(json.dumps(missing) + "\n")
    with pytest.raises(RecordFileError, match=r"r\.jsonl:1: .*prompt_ids"):
        read_records(path, RolloutRecord)

    path.write_text(good + "\n[1, 2]\n")
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2: expected a JSON object"):
        read_records(path, RolloutRecord)

    with pytest.raises(RecordFileError, match="file not found"):
        read_records(tmp_path / "missing.jsonl", RolloutRecord)


def test_parquet_round_trip_or_clear_error(setup, tmp_path):
    _, rollouts, _, _ = setup
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(RecordFileError, match="pyarrow"):
            write_records(tmp_path / "r.parquet", rollouts)
        assert not list(tmp_path.iterdir())
        return
    path = write_records(tmp_path / "r.parquet", rollouts)
    assert read_records(path, RolloutRecord) == rollouts
