"""Digit-sum: the synthetic task behind the embedded default configuration.

The question is n single digits separated by spaces; the answer is their sum modulo 10, one digit.

Design decisions:
- Difficulty (the digit count) is assigned round-robin over ``min_digits..max_digits``, so every prefix
  of the list, and so every batch drawn in order, spans the difficulties evenly. Calibration needs easy
  and hard items side by side; random draws can leave a small set lopsided.
- Digits come from a private ``random.Random(seed)``: deterministic for a seed and independent of any
  global RNG state another component may have touched.
- The demonstration is the bare answer with full confidence, ``"<d> Confidence: 1.0"``: a demonstration
  of the reference answer is certain by construction.
- The verifier compares the answer part (text before the confidence marker) with the reference digit
  exactly: "07" or "7." is wrong, so the reward cannot be gamed with near-misses.
"""
from __future__ import annotations

import random

from caopd_megatron.config.schema import CONFIDENCE_MARKER
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.tasks.base import extract_answer, register_task

__all__ = ["TASK_NAME", "digit_sum_answer", "make_digit_sum_records", "verify_digit_sum"]

TASK_NAME = "digit_sum"


def digit_sum_answer(digits: list[int]) -> int:
    return sum(digits) % 10


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def make_digit_sum_records(
    n: int,
    seed: int,
    min_digits: int = 1,
    max_digits: int = 5,
    id_prefix: str = "ds",
) -> list[PromptRecord]:
    """``n`` digit-sum records, deterministic for ``seed``; ``meta["n_digits"]`` holds each difficulty."""
    _check_int("n", n, 0)
    _check_int("min_digits", min_digits, 1)
    _check_int("max_digits", max_digits, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if min_digits > max_digits:
        raise ValueError(f"min_digits ({min_digits}) must not exceed max_digits ({max_digits})")
    if not isinstance(id_prefix, str) or not id_prefix.strip():
        raise ValueError(f"id_prefix must be a non-empty string, got {id_prefix!r}")

    rng = random.Random(seed)
    span = max_digits - min_digits + 1
    records: list[PromptRecord] = []
    for i in range(n):
        n_digits = min_digits + i % span
        digits = [rng.randrange(10) for _ in range(n_digits)]
        answer = str(digit_sum_answer(digits))
        records.append(
            PromptRecord(
                id=f"{id_prefix}-{i}",
                question=" ".join(map(str, digits)),
                reference=answer,
                task=TASK_NAME,
                demonstration=f"{answer} {CONFIDENCE_MARKER} 1.0",
                meta={"n_digits": n_digits},
            )
        )
    return records


def verify_digit_sum(response: str, reference: str) -> bool:
    """True when the answer part of ``response`` is exactly the reference digit."""
    ref = reference.strip()
    if len(ref) != 1 or not ref.isdigit() or not ref.isascii():
        raise ValueError(f"digit_sum reference must be a single digit 0-9, got {reference!r}")
    return extract_answer(response) == ref


register_task(TASK_NAME, verify_digit_sum)
