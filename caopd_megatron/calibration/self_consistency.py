"""Confidence without a verifier: agreement among the K samples, anchored on the privileged teacher's answer.

Definition (``calibration.confidence_source=self_consistency``):
- The anchor is the teacher's answer under privileged context, taken as the answer part of the privileged
  demonstration (the record's ``demonstration``, or the reference-based default ``"<reference> Confidence:
  1.0"``), normalised by the task family's ``normalise_answer`` (``data.tasks``).
- ``p = (number of the K samples whose normalised answer equals the anchor) / K``.
- Without an anchor (no demonstration, or one whose answer does not normalise) ``p`` is the share of the
  modal answer among the K samples. Samples without a normalisable answer count in K but never agree; ties
  between modal answers do not matter (the share is the same).
- A sample's ``correct`` is then its verifier's verdict when the family has a verifier (so the logged
  accuracy stays the verified one), otherwise its agreement with the anchor (or the modal answer).
Differences from verified accuracy: a wrong demonstration makes p measure agreement with a wrong answer;
without an anchor, a consistent but wrong student gets a high p (measured: benchmarks/bench_self_consistency.py).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.tasks.base import get_normaliser


def anchor_answer(record: PromptRecord, demonstration: str) -> Optional[str]:
    """The normalised answer of the privileged ``demonstration`` for ``record``'s task family (None: no anchor)."""
    return get_normaliser(record.task)(demonstration)


def agreement(answers: Sequence[Optional[str]], anchor: Optional[str]) -> list[bool]:
    """Per sample: its normalised answer equals the anchor (or, without one, the modal answer)."""
    target = anchor
    if target is None:
        counts = Counter(a for a in answers if a is not None)
        target = counts.most_common(1)[0][0] if counts else None
    return [a is not None and a == target for a in answers]


def self_consistency_confidence(answers: Sequence[Optional[str]], anchor: Optional[str]) -> float:
    """``p`` of the module docstring for one prompt's K normalised answers."""
    if not answers:
        raise ValueError("self-consistency needs at least one sample")
    return sum(agreement(answers, anchor)) / len(answers)
