"""A step's diagnostics, separately for answer tokens and confidence tokens.

Design decisions:
- Confidence tokens are the response tokens after the confidence marker (found in the token ids: the first
  occurrence of the marker's encoding); every other loss token is an answer token. The marker is the
  configured ``calibration.marker`` (default ``config.schema.CONFIDENCE_MARKER``).
- Per group the step reports token-weighted means over all its loss tokens (all micro-batches, all DP
  ranks): student and teacher entropy, the divergence, the teacher's mass outside the student's top-k, and
  for the sampled estimator (vOPD) the standard deviation of its advantage. ``None`` where a group has no
  token (or, for the advantage, the objective has none).
- The per-token values come from the loss's own collective (``token_diagnostics``); the step adds one
  reduction of 14 numbers over DP (and a broadcast from the last pipeline stage), like its loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from caopd_megatron.distill.token_diagnostics import DiagnosticsSink
from caopd_megatron.parallel.data_parallel import (
    all_reduce_dp,
    broadcast_from_last_stage,
    data_parallel_size,
    model_groups,
    pipeline_parallel_size,
)

GROUPS = ("answer", "confidence")
# Logged per group as f"{group}_{name}".
STATISTICS = ("student_entropy", "teacher_entropy", "divergence", "teacher_tail", "advantage_sd")
# Accumulated per group: token count, sums of the four means, sum and sum of squares of the advantage.
_SUMS = 7


def diagnostic_keys() -> list[str]:
    """The train-log keys, in order."""
    return [f"{group}_{name}" for group in GROUPS for name in STATISTICS]


def marker_patterns(tokenizer, marker: str) -> tuple[tuple[int, ...], ...]:
    """The marker's token ids as it can appear in a response: alone and after a space (BPE merges the space)."""
    patterns = {tuple(tokenizer.encode(text)) for text in (marker, " " + marker)}
    return tuple(sorted(p for p in patterns if p))


def confidence_token_mask(targets: torch.Tensor, mask: torch.Tensor,
                          patterns: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[b, R]`` bool: loss tokens after the first marker occurrence (any of ``patterns``) in each row."""
    rows = targets.cpu()
    first_after = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long)  # no marker: no token
    for pattern in patterns:
        width = len(pattern)
        if width == 0 or rows.shape[1] < width:
            continue
        hits = (rows.unfold(1, width, 1) == torch.as_tensor(list(pattern), dtype=rows.dtype)).all(dim=-1)
        found = hits.any(dim=-1)
        ends = hits.to(torch.int8).argmax(dim=-1) + width
        first_after = torch.where(found, torch.minimum(first_after, ends), first_after)
    positions = torch.arange(rows.shape[1]).unsqueeze(0)
    return (positions >= first_after.unsqueeze(-1)) & mask.cpu().bool()


@dataclass
class StepDiagnostics:
    """Collects one step's diagnostics: the loss fills ``sink``, ``absorb`` folds each micro-batch in."""

    marker_ids: tuple[tuple[int, ...], ...]  # ``marker_patterns``
    top_k: int = 8
    sink: DiagnosticsSink = field(init=False)
    sums: torch.Tensor = field(init=False)  # [2, 7] float64 on CPU: this rank's running sums

    def __post_init__(self) -> None:
        self.sink = DiagnosticsSink(self.top_k)
        self.reset()

    def reset(self) -> None:
        self.sink.take()
        self.sums = torch.zeros((len(GROUPS), _SUMS), dtype=torch.float64)

    def absorb(self, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold the sink's rows of one micro-batch (``[b, R]`` targets and 0/1 loss mask) into the sums."""
        rows = self.sink.take().detach().to("cpu", torch.float64)  # [b * R, 5]
        if rows.numel() == 0:
            return
        confidence = confidence_token_mask(targets, mask, self.marker_ids).reshape(-1)
        answer = mask.cpu().bool().reshape(-1) & ~confidence
        for g, selected in enumerate((answer, confidence)):
            chosen = rows[selected]
            advantage = chosen[:, 4]
            self.sums[g, 0] += chosen.shape[0]
            self.sums[g, 1:5] += chosen[:, :4].sum(dim=0)
            self.sums[g, 5] += advantage.sum()  # NaN for full-vocabulary objectives: reported as None
            self.sums[g, 6] += advantage.square().sum()

    def summary(self, model) -> dict[str, Optional[float]]:
        """The step's ``diagnostic_keys()`` values, identical on every rank (sums reduced over DP and PP)."""
        sums = self.sums
        groups = model_groups(model)
        if data_parallel_size(groups) > 1 or pipeline_parallel_size(groups) > 1:
            sums = sums.to(next(model.parameters()).device)
            all_reduce_dp(sums, groups)
            broadcast_from_last_stage(sums, groups)
            sums = sums.cpu()
        out: dict[str, Optional[float]] = {}
        for g, group in enumerate(GROUPS):
            count = float(sums[g, 0])
            means = [float(v) / count if count else None for v in sums[g, 1:5]]
            sd = None
            if count and math.isfinite(float(sums[g, 5])):
                mean = float(sums[g, 5]) / count
                sd = math.sqrt(max(float(sums[g, 6]) / count - mean * mean, 0.0))
            for name, value in zip(STATISTICS, (*means, sd)):
                out[f"{group}_{name}"] = value
        self.reset()
        return out
