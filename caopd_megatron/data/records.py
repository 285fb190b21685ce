"""The rows that flow between the phases: sampled rollouts and the revised distillation examples.

Design decisions:
- Plain dataclasses of token ids, text and numbers, so ``records_io`` writes them as JSONL/Parquet rows and a
  cluster launcher can run rollout, rewrite and distill as separate jobs with one schema.
- They live in ``data`` (the bottom layer) because every phase reads them: ``rollout`` produces
  ``RolloutRecord``s, ``calibration.revise`` turns them into ``DistillExample``s, ``distill`` consumes those.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RolloutRecord:
    """One sampled response (a row of the rollout file)."""

    prompt_id: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # includes EOS when the model emitted it
    text: str  # decoded response without special tokens
    logprobs: list[float] = field(default_factory=list)
    seed: int = 0
    finished: bool = True


@dataclass
class DistillExample:
    """One revised response, ready to be scored by teacher and student (a row of the revised file)."""

    prompt_id: str
    sample_index: int
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    correct: bool
    stated_confidence: float | None  # what the student said
    empirical_confidence: float  # correct / K for its prompt
    text: str  # the (revised) response text
