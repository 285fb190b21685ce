"""``data.grading``: the single grader behind rollout revision and evaluation.

Reference: digit-sum prompts whose right answers are the records' references and wrong answers are made by
hand, so the expected verdicts are known without running any verifier.
"""
import pytest

from caopd_megatron.data.grading import grade_response, grade_rollouts
from caopd_megatron.data.records import RolloutRecord
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records


def _rollout(prompt_id: str, text: str) -> RolloutRecord:
    return RolloutRecord(prompt_id=prompt_id, sample_index=0, prompt_ids=[1], response_ids=[2], text=text)


def test_verdicts_match_the_hand_made_answers():
    recs = make_digit_sum_records(4, seed=1, min_digits=3, max_digits=4)
    prompts = {r.id: r for r in recs}
    cases = []
    for r in recs:
        wrong = str((int(r.reference) + 3) % 40)
        cases += [(r, f"{r.reference} Confidence: 0.9", True), (r, f"{wrong} Confidence: 0.9", False),
                  (r, "no answer at all", False)]
    assert [grade_response(r, text) for r, text, _ in cases] == [want for _, _, want in cases]
    rollouts = [_rollout(r.id, text) for r, text, _ in cases]
    assert grade_rollouts(rollouts, prompts) == [want for _, _, want in cases]


def test_a_rollout_of_an_unknown_prompt_is_an_error():
    (rec,) = make_digit_sum_records(1, seed=2)
    with pytest.raises(KeyError, match="unknown prompt id 'elsewhere'"):
        grade_rollouts([_rollout(rec.id, rec.reference), _rollout("elsewhere", "1")], {rec.id: rec})
