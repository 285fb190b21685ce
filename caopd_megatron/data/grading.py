"""Grading a response against its prompt's reference: the one place rollouts and evaluations are graded.

Design decisions:
- The prompt's task family picks the verifier (``data.tasks``); the verifier sees only the response text
  and the reference, never runs model text, and its verdict is a plain ``bool``.
- A rollout that names an unknown prompt id is an error (a phase file from another prompt set), not a
  wrong answer.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.records import RolloutRecord
from caopd_megatron.data.tasks.base import get_verifier


def grade_response(record: PromptRecord, text: str) -> bool:
    """Whether ``text`` answers ``record`` correctly, by its task family's verifier."""
    return bool(get_verifier(record.task)(text, record.reference))


def grade_rollouts(rollouts: Sequence[RolloutRecord], prompts: Mapping[str, PromptRecord]) -> list[bool]:
    """The verdict of every rollout, in order; ``KeyError`` for a rollout of an unknown prompt."""
    out = []
    for r in rollouts:
        if r.prompt_id not in prompts:
            raise KeyError(f"rollout refers to unknown prompt id {r.prompt_id!r}")
        out.append(grade_response(prompts[r.prompt_id], r.text))
    return out
