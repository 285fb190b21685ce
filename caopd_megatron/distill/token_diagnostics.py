"""Per-token diagnostics of a distillation loss, carried by the loss's own forward collective.

Design decisions:
- What is measured per response token: the student's and the teacher's entropy ``H(p)``, ``H(q)`` over the
  real vocabulary, the teacher's mass outside the student's top-k (``1 - sum_{j in top-k(p)} q_j``, the tail),
  the loss's divergence, and for the sampled estimator its advantage (``sampled_token``).
- No extra collective: each vocab shard contributes ``6 + 2k`` local columns (its row max, sum of exp and
  sum of ``exp * logit`` for both models, then its local top-k student logits and the teacher logits at those
  ids); they ride on the divergence's first all-gather (``ShardPass.forward_with``). The global top-k needs
  these ``k`` candidates per shard (a small all-gather of ``2k`` values per token, on that same collective);
  the entropies merge with the log-sum-exp rule like the KL.
- The same gathered columns give the student's top-k support with its log-probabilities, which the sampled
  estimator's top-k baseline uses.
- ``DiagnosticsSink`` is the hand-off out of an autograd Function: the loss appends ``[N, 5]`` rows
  (``SINK_COLUMNS``) in forward; the step masks and reduces them (``distill.step_diagnostics``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from caopd_megatron.distill.divergence_math import VocabParallelDivergence as _Math
from caopd_megatron.distill.divergence_passes import ShardPass, rows_per_chunk, token_chunks

SINK_COLUMNS = ("student_entropy", "teacher_entropy", "divergence", "teacher_tail", "advantage")


@dataclass
class DiagnosticsSink:
    """Collects ``[N, len(SINK_COLUMNS)]`` fp32 per-token rows from the losses' forward (replicated on TP)."""

    top_k: int = 8
    rows: list = field(default_factory=list)

    def add(self, support: "StudentSupport", divergence: torch.Tensor, advantage: torch.Tensor | None) -> None:
        advantage = torch.full_like(divergence, math.nan) if advantage is None else advantage
        self.rows.append(torch.stack((support.student_entropy, support.teacher_entropy, divergence.detach().float(),
                                      support.teacher_tail, advantage.float()), dim=-1))

    def take(self) -> torch.Tensor:
        """The rows added since the last call, concatenated ``[N, 5]``; the sink is emptied."""
        rows, self.rows = self.rows, []
        return torch.cat(rows) if rows else torch.zeros((0, len(SINK_COLUMNS)))


class StudentSupport(NamedTuple):
    """Merged per-token results ``[N]`` (and ``[N, k]``), identical on every rank of the TP group."""

    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    teacher_tail: torch.Tensor  # 1 - teacher mass on the student's top-k
    log_p_top: torch.Tensor  # [N, k] student log-probabilities of its top-k ids (-inf where fewer ids exist)
    log_q_top: torch.Tensor  # [N, k] teacher log-probabilities of the same ids


def num_columns(top_k: int) -> int:
    """Local columns per token a shard contributes for ``top_k``."""
    return 6 + 2 * top_k


@torch.no_grad()
def local_columns(shard: ShardPass, top_k: int) -> torch.Tensor:
    """``[num_rows, 6 + 2k]`` local columns of this shard (see the module docstring); no communication.

    Layout: (max_s, sum exp s', sum exp s' * s', max_t, sum exp t', sum exp t' * t', top-k raw student
    logits [k], raw teacher logits at those ids [k]); ``x' = (x - local max) / T``, maxima in raw units,
    absent candidates -inf.
    """
    out = torch.full((shard.num_rows, num_columns(top_k)), -math.inf, dtype=torch.float32, device=shard.device)
    if shard.num_cols == 0:
        out[:, [1, 2, 4, 5]] = 0.0
        return out
    k = min(top_k, shard.num_cols)
    chunk = rows_per_chunk(shard.num_rows, shard.num_cols, shard.reference_bytes, 3)
    work = torch.empty((3, chunk, shard.num_cols), dtype=torch.float32, device=shard.device)
    for rows, c in token_chunks(shard.num_rows, chunk):
        s = _Math.load_(work[0, :c], shard.student, rows)
        t = _Math.load_(work[1, :c], shard.teacher, rows)
        top_s, ids = s.topk(k, dim=-1)
        out[rows, 6:6 + k] = top_s
        out[rows, 6 + top_k:6 + top_k + k] = t.gather(-1, ids)
        for first, buf in ((0, s), (3, t)):
            out[rows, first] = _Math.shift_by_row_max_(buf)
            scaled = _Math.scale_(buf, shard.temperature)
            weights = torch.exp(scaled, out=work[2, :c])
            out[rows, first + 1] = weights.sum(dim=-1)
            out[rows, first + 2] = weights.mul_(scaled).sum(dim=-1)
    return out


def _merge_entropy(row_max: torch.Tensor, sum_exp: torch.Tensor, sum_weighted: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[tp, N]`` per-shard columns -> global (raw max, log Z, entropy), ``[N]`` each."""
    global_max = row_max.amax(dim=0)
    offset = _Math.scale_(row_max - global_max, temperature)
    weight = torch.exp(offset)
    z = (weight * sum_exp).sum(dim=0)
    # An all-padding shard has max -inf (offset NaN) and contributes nothing.
    moment = torch.where(sum_exp > 0, weight * (sum_weighted + offset * sum_exp), torch.zeros_like(sum_exp))
    log_z = torch.log(z)
    return global_max, log_z, log_z - moment.sum(dim=0) / z


def merge_columns(gathered: torch.Tensor, temperature: float, top_k: int) -> StudentSupport:
    """``[tp, N, 6 + 2k]`` gathered ``local_columns`` -> the merged ``StudentSupport`` (no communication)."""
    max_s, log_z_s, entropy_s = _merge_entropy(gathered[..., 0], gathered[..., 1], gathered[..., 2], temperature)
    max_t, log_z_t, entropy_t = _merge_entropy(gathered[..., 3], gathered[..., 4], gathered[..., 5], temperature)
    num_rows = gathered.shape[1]
    candidates_s = gathered[..., 6:6 + top_k].permute(1, 0, 2).reshape(num_rows, -1)  # [N, tp * k]
    candidates_t = gathered[..., 6 + top_k:].permute(1, 0, 2).reshape(num_rows, -1)
    k = min(top_k, candidates_s.shape[-1])
    top_s, ids = candidates_s.topk(k, dim=-1)
    top_t = candidates_t.gather(-1, ids)
    log_p = _Math.scale_(top_s - max_s.unsqueeze(-1), temperature) - log_z_s.unsqueeze(-1)
    log_q = _Math.scale_(top_t - max_t.unsqueeze(-1), temperature) - log_z_t.unsqueeze(-1)
    tail = (1.0 - log_q.exp().sum(dim=-1)).clamp_(min=0.0)
    return StudentSupport(entropy_s, entropy_t, tail, log_p, log_q)


def top_k_expected_reward(support: StudentSupport) -> torch.Tensor:
    """``[N]`` ``sum_{j in top-k} p~_j (log q_j - log p_j)``, ``p~`` the student renormalised on its top-k."""
    log_p, log_q = support.log_p_top, support.log_q_top
    weights = torch.softmax(log_p, dim=-1)
    reward = torch.where(weights > 0, log_q - log_p, torch.zeros_like(log_p))
    return (weights * reward).sum(dim=-1)
