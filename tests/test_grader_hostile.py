"""Every registered grader on hostile model text: total (never raises) and linear (time and memory per grade).

Each case is about 1 MB of text built to hit a known weak spot: whitespace runs inside tags (regex
backtracking), integers past Python's 4,300-digit str->int limit, JSON nested past the recursion limit,
code that would do harm if evaluated, unbalanced braces, and thousands of markers. A grade must return a
bool, take under ``TIME_BOUND_S`` of CPU time (wall time on a shared machine measures the other jobs) and
allocate under ``MEMORY_BOUND_BYTES`` at peak. A quadratic grader on 1 MB takes minutes, so the bounds
separate linear from quadratic with a wide margin.
"""
from __future__ import annotations

import json
import random
import time
import tracemalloc

import pytest

from caopd_megatron.data.tasks.base import get_verifier, known_tasks

MB = 1 << 20
TIME_BOUND_S = 3.0
MEMORY_BOUND_BYTES = 64 * MB

# One well-formed reference per built-in task family.
REFERENCES = {
    "digit_sum": "7",
    "chemistry_mcq": "B",
    "tooluse": json.dumps([{"Action": "search", "Action_Input": json.dumps({"q": 1})}]),
    "math": "3/4",
}


def _random_text(n: int) -> str:
    rng = random.Random(0)
    alphabet = "abc {}[]()<>/\\:,.-+%0123456789\n\t\"'$" + "\u00a0\u2009"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _hostile_texts() -> dict[str, str]:
    n = MB
    spaces = " " * n
    huge = "9" * n
    return {
        "spaces_in_answer_tag": "<answer>" + spaces + "x</answer>",
        "spaces_then_letter_then_junk": "<answer>(" + spaces + "B" + spaces + ")" + spaces + "?",
        "open_tags": "<answer>" * (n // 8),
        "huge_int_json": "Action: search\nAction Input: {\"q\": " + huge + "}",
        "int_just_over_str_limit": "Action: search\nAction Input: {\"q\": " + "1" * 4301 + "}",
        "huge_float_json": "Action: search\nAction Input: {\"q\": " + huge + ".5e99999}",
        "nested_json_arrays": "Action: search\nAction Input: " + "[" * n,
        "nested_json_objects": "Action: search\nAction Input: " + "{\"a\":" * (n // 5),
        "many_actions": "Action: search\n" * (n // 15),
        "code_python": ("```python\n__import__('os').system('touch /tmp/pwned')\n```\n" * (n // 50)),
        "code_in_box": "\\boxed{__import__('os').system('echo pwned')}" * (n // 45),
        "huge_int_answer": "The answer is " + huge,
        "huge_boxed": "\\boxed{" + huge + "}",
        "huge_fraction": "\\frac{" + huge + "}{" + huge + "}",
        "unclosed_boxes": "\\boxed{" * (n // 7),
        "deep_braces": "{" * (n // 2) + "}" * (n // 2),
        "many_frac": "\\frac{1}{" * (n // 9),
        "answer_colons": "Answer:" * (n // 7),
        "minus_signs": "-" * n,
        "digit_comma_runs": "1," * (n // 2),
        "markers": "Confidence:" * (n // 11),
        "marker_then_spaces": "9 Confidence:" + spaces + "x",
        "random": _random_text(n),
    }


HOSTILE = _hostile_texts()


def _grade_bounded(verify, text: str, reference: str) -> tuple[object, float, int]:
    start = time.process_time()  # CPU time of this process: a loaded machine stretches wall time, not this
    result = verify(text, reference)
    elapsed = time.process_time() - start
    tracemalloc.start()
    try:
        verify(text, reference)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, elapsed, peak


@pytest.mark.parametrize("task", sorted(REFERENCES))
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_grader_is_total_and_linear_on_hostile_text(task, case):
    if task not in known_tasks():
        pytest.fail(f"task {task} is not registered")
    verify = get_verifier(task)
    result, elapsed, peak = _grade_bounded(verify, HOSTILE[case], REFERENCES[task])
    assert isinstance(result, bool)
    assert result is False  # none of these texts is a correct answer
    assert elapsed < TIME_BOUND_S, f"{task} on {case}: {elapsed:.2f} s of CPU"
    assert peak < MEMORY_BOUND_BYTES, f"{task} on {case}: {peak / MB:.1f} MB peak"


def test_every_registered_task_has_a_hostile_reference():
    assert set(known_tasks()) <= set(REFERENCES)
