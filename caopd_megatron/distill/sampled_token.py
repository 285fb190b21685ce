"""The sampled-token estimator of the on-policy reverse-KL objective, with its closed-form baseline.

Design decisions:
- For a sampled token ``y_t ~ p`` the reward is ``r_t = log q(y_t) - log p(y_t)`` (its expectation under p
  is ``-KL(p||q)``), so ``r_t - V(s_t)`` with ``V(s_t) = -KL(p||q)(s_t)`` is a zero-mean, lower-variance
  advantage for a policy-gradient update. Not wired into the step yet; a config choice will select it.
- No gradient. It reuses the reverse-KL statistics pass of ``divergence_passes`` and rides on its single
  all-gather: two extra per-token columns carry the sampled logits, contributed by the TP rank that owns
  the id and 0 elsewhere.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from caopd_megatron.distill.divergence_math import VocabParallelDivergence as _Math
from caopd_megatron.distill.divergence_math import resolve_divergence
from caopd_megatron.distill.divergence_passes import ShardPass, TokenStats
from caopd_megatron.distill.vocab_realign import (
    Piece,
    effective_tp_group,
    layout_logits,
    resolve_real_vocab,
    tp_rank_and_size,
)


class SampledTokenAdvantage(NamedTuple):
    """Per-token fp32 tensors ``[...]``, identical on every rank of tp_group, no gradient."""

    advantage: torch.Tensor  # r_t - V(s_t) = log q(y_t) - log p(y_t) + KL(p||q)(s_t)
    log_ratio: torch.Tensor  # r_t = log q(y_t) - log p(y_t)
    reverse_kl: torch.Tensor  # KL(p||q)(s_t) = -V(s_t)


def _owned_values(pieces: Sequence[Piece], local_ids: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """Logit at column ``local_ids`` of the stitched pieces (-inf read as ``MASKED_LOGIT``), 0 where not ``owned``."""
    values = torch.zeros(local_ids.shape, dtype=torch.float32, device=local_ids.device)
    for start, stop, src in pieces:
        inside = owned & (local_ids >= start) & (local_ids < stop)
        index = (local_ids - start).clamp(0, max(stop - start - 1, 0)).unsqueeze(-1)
        picked = _Math.unmask_(src.gather(-1, index).squeeze(-1).float()) if stop > start else values
        values = torch.where(inside, picked, values)
    return values


@torch.no_grad()
def sampled_token_advantage(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    sampled_tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    real_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> SampledTokenAdvantage:
    """Advantage of the sampled token under the on-policy reverse-KL objective, with baseline V = -KL(p||q).

    The per-token reward of sampling ``y_t ~ p`` is ``r_t = log q(y_t) - log p(y_t)`` (its expectation
    under p is ``-KL(p||q)``), so ``r_t - V(s_t) = r_t + KL(p||q)`` is a zero-mean, lower-variance
    advantage for a policy-gradient update. One collective (the KL all-gather carries two extra
    per-token columns: the sampled logits, contributed by the rank that owns the id and 0 elsewhere).

    Args:
        student_logits, teacher_logits: as in ``vocab_parallel_divergence`` (on tp_group).
        sampled_tokens: ``[...]`` integer ids ``< real_vocab_size`` (global ids, replicated on tp_group).
    """
    kind = resolve_divergence("reverse_kl", 0.0, temperature)
    tp_group = effective_tp_group(tp_group)
    real_vocab = resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size, tp_group)
    layout = layout_logits(student_logits, teacher_logits, real_vocab, tp_group)
    shard = ShardPass.over_logits(layout.student_2d, layout.num_cols, layout.teacher_pieces, kind,
                                  float(temperature), 0.0)
    shape = student_logits.shape[:-1]
    if shard.num_rows == 0:
        empty = torch.zeros(shape, dtype=torch.float32, device=student_logits.device)
        return SampledTokenAdvantage(empty, empty.clone(), empty.clone())
    rank, _ = tp_rank_and_size(tp_group)
    ids = sampled_tokens.reshape(-1).to(torch.long) - rank * layout.student_2d.shape[1]
    owned = (ids >= 0) & (ids < shard.num_cols)
    local = torch.cat((shard.kl_stats(), _owned_values(shard.student, ids, owned).unsqueeze(-1),
                       _owned_values(shard.teacher, ids, owned).unsqueeze(-1)), dim=-1)
    gathered = _Math.gather_token_stats(local, tp_group)
    stats = TokenStats.from_kl(gathered[..., :5], kind, shard.temperature)
    # Exactly one rank owns each id, the others add zeros, so the sum is the owner's (raw) logit.
    sampled_s, sampled_t = gathered[..., 5:].sum(dim=0).unbind(dim=-1)
    log_q = _Math.scale_(sampled_t - stats.max_t, shard.temperature) - stats.log_z_t
    log_p = _Math.scale_(sampled_s - stats.max_s, shard.temperature) - stats.log_z_s
    log_ratio = log_q - log_p
    kl = stats.loss
    return SampledTokenAdvantage((log_ratio + kl).view(shape), log_ratio.view(shape), kl.view(shape))
