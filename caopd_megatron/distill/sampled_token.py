"""vOPD: the sampled-token estimator of the on-policy reverse-KL objective, with its closed-form baseline.

Design decisions:
- For a sampled token ``y_t ~ p`` the reward is ``r_t = log q(y_t) - log p(y_t)`` (its expectation under p
  is ``-KL(p||q)``), so ``A_t = r_t - V(s_t)`` with ``V(s_t) = -KL(p||q)(s_t)`` is a zero-mean, lower-variance
  advantage; the detached ``A_t`` drives a policy-gradient step on ``-A_t log p(y_t)``, whose expectation
  over ``y_t ~ p`` is the exact reverse-KL gradient (tested by Monte Carlo).
- Baselines (``distill.vopd_baseline``): ``none`` (V = 0, the plain estimator), ``full`` (V = -KL over the
  whole real vocabulary, from the reverse-KL statistics) and ``top_k`` (V = the expected reward under the
  student renormalised on its top-k: ``sum_{j in top-k} p~_j (log q_j - log p_j)``). ``vopd_reward_clip``
  clips ``r_t`` from below before the baseline is subtracted (the baseline itself is not clipped).
- One collective: the reverse-KL all-gather carries two extra per-token columns (the sampled token's logits,
  contributed by the TP rank that owns the id and 0 elsewhere) and, for the top-k baseline or diagnostics,
  the support columns of ``token_diagnostics``. Backward ``g A (p - e_y) / T`` is local to each shard.
- The loss's *value* is the full-vocabulary KL(p||q) (what the other objectives report); only its gradient
  is the sampled estimator. The forward columns, their merge, the advantage and the backward are helpers
  (``sampled_columns``, ``SampledStats``, ``write_policy_gradient``) that the fused output loss
  (``fused_output_loss``, ``distill.fused``) calls chunk by chunk on the same statistics.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from caopd_megatron.distill.divergence_math import VocabParallelDivergence as _Math
from caopd_megatron.distill.divergence_math import resolve_divergence
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.divergence_passes import ShardPass, TokenStats, rows_per_chunk, token_chunks
from caopd_megatron.distill.token_diagnostics import (
    StudentSupport,
    local_columns,
    merge_columns,
    top_k_expected_reward,
)
from caopd_megatron.distill.vocab_realign import (
    Piece,
    effective_tp_group,
    layout_logits,
    resolve_real_vocab,
    tp_rank_and_size,
)

BASELINES = ("none", "full", "top_k")


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
def sampled_token_advantage(student_logits: torch.Tensor, teacher_logits: torch.Tensor, sampled_tokens: torch.Tensor,
                            options: DivergenceOptions = DivergenceOptions(divergence="vopd")) -> SampledTokenAdvantage:
    """Advantage of the sampled token under the on-policy reverse-KL objective, with baseline V = -KL(p||q).

    The per-token reward of sampling ``y_t ~ p`` is ``r_t = log q(y_t) - log p(y_t)`` (its expectation
    under p is ``-KL(p||q)``), so ``r_t - V(s_t) = r_t + KL(p||q)`` is a zero-mean, lower-variance
    advantage for a policy-gradient update. One collective (the KL all-gather carries two extra
    per-token columns: the sampled logits, contributed by the rank that owns the id and 0 elsewhere).

    Args:
        student_logits, teacher_logits: as in ``vocab_parallel_divergence`` (on ``options.tp_group``).
        sampled_tokens: ``[...]`` integer ids ``< real_vocab_size`` (global ids, replicated on tp_group).
        options: ``temperature``, ``real_vocab_size``, ``tp_group`` are read (the baseline here is always ``full``).
    """
    check_sampled_options(options)
    tp_group = effective_tp_group(options.tp_group)
    real_vocab = resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], options.real_vocab_size,
                                    tp_group)
    merged = _sampled_forward(student_logits, teacher_logits, sampled_tokens, float(options.temperature), real_vocab,
                              tp_group, 0).merged
    shape = student_logits.shape[:-1]
    kl = merged.stats.loss
    return SampledTokenAdvantage((merged.log_ratio + kl).view(shape), merged.log_ratio.view(shape), kl.view(shape))


def support_size(options: DivergenceOptions) -> int:
    """k of the one support that serves the baseline and the diagnostics (with the top_k baseline, its k for
    both); 0 when neither needs one."""
    if options.baseline == "top_k":
        return options.top_k
    return options.diagnostics.top_k if options.diagnostics is not None else 0


def sampled_ids(sampled_tokens: torch.Tensor, shard_width: int, num_cols: int,
                tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` sampled ids relative to this rank's first column (``shard_width`` = V/tp) and whether it owns them."""
    rank, _ = tp_rank_and_size(tp_group)
    ids = sampled_tokens.reshape(-1).to(torch.long) - rank * shard_width
    return ids, (ids >= 0) & (ids < num_cols)


def sampled_columns(shard: ShardPass, local_ids: torch.Tensor, owned: torch.Tensor, support_k: int) -> torch.Tensor:
    """Local ``[num_rows, 7 (+ 6 + 2k)]`` columns of the sampled-token forward; no communication.

    Layout: the reverse-KL ``kl_stats`` (5), the sampled token's raw student and teacher logit (on the rank
    that owns its id, 0 elsewhere) and, for ``support_k`` > 0, the support columns of ``token_diagnostics``.
    """
    local = [shard.kl_stats(), _owned_values(shard.student, local_ids, owned).unsqueeze(-1),
             _owned_values(shard.teacher, local_ids, owned).unsqueeze(-1)]
    if support_k:
        local.append(local_columns(shard, support_k))
    return torch.cat(local, dim=-1)


class SampledStats(NamedTuple):
    """The merged ``[tp, N, k]`` gathered ``sampled_columns``: per-token ``[N]`` fp32, replicated on tp_group."""

    stats: TokenStats  # reverse-KL statistics: loss = KL(p||q), student/teacher normalisers
    log_ratio: torch.Tensor  # r_t = log q(y_t) - log p(y_t)
    support: Optional[StudentSupport]  # the student's top-k support (support_k > 0)

    @staticmethod
    def empty(device: torch.device) -> "SampledStats":
        return SampledStats(TokenStats.empty(device), torch.zeros(0, dtype=torch.float32, device=device), None)

    @staticmethod
    def merge(gathered: torch.Tensor, temperature: float, support_k: int) -> "SampledStats":
        stats = TokenStats.from_kl(gathered[..., :5], "reverse_kl", temperature)
        # Exactly one rank owns each id, the others add zeros, so the sum is the owner's (raw) logit.
        sampled_s, sampled_t = gathered[..., 5:7].sum(dim=0).unbind(dim=-1)
        log_q = _Math.scale_(sampled_t - stats.max_t, temperature) - stats.log_z_t
        log_p = _Math.scale_(sampled_s - stats.max_s, temperature) - stats.log_z_s
        support = merge_columns(gathered[..., 7:], temperature, support_k) if support_k else None
        return SampledStats(stats, log_q - log_p, support)

    def advantage(self, options: DivergenceOptions) -> torch.Tensor:
        """``[N]`` A_t = clip(r_t) - V(s_t) for ``options.baseline``; passes it to ``options.diagnostics``."""
        reward = self.log_ratio if options.reward_clip is None else self.log_ratio.clamp(min=reward_clip(options))
        if options.baseline == "full":
            advantage = reward + self.stats.loss  # V = -KL(p||q)
        elif options.baseline == "top_k":
            advantage = reward - top_k_expected_reward(self.support)
        else:
            advantage = reward
        if options.diagnostics is not None and advantage.numel() > 0:
            options.diagnostics.add(self.support, self.stats.loss, advantage)
        return advantage


def write_policy_gradient(shard: ShardPass, norm_s: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor,
                          local_ids: torch.Tensor, owned: torch.Tensor, out: torch.Tensor) -> None:
    """``out[num_rows, num_cols]`` (any float dtype) <- ``w (p - e_y)``; no communication.

    ``norm_s``: the student's global (max, log Z); ``weight`` = ``g A / T``; ``local_ids``/``owned`` as from
    ``sampled_ids``; all ``[num_rows]``. Reads the student pieces of ``shard`` only.
    """
    if shard.num_cols == 0 or shard.num_rows == 0:
        return
    chunk = rows_per_chunk(shard.num_rows, shard.num_cols, shard.reference_bytes, 1)
    work = torch.empty((chunk, shard.num_cols), dtype=torch.float32, device=shard.device)
    for rows, c in token_chunks(shard.num_rows, chunk):
        p = _Math.load_log_probs_(work[:c], shard.student, rows, shard.temperature, *norm_s).exp_()
        out[rows] = p.mul_(weight[rows].unsqueeze(-1))
    # The sampled token's -g A / T, on the rank that owns its id.
    rows = owned.nonzero().squeeze(-1)
    out[rows, local_ids[rows]] -= weight[rows].to(out.dtype)


class _SampledForward(NamedTuple):
    """What one forward pass over logits yields for ``N`` tokens."""

    shard: ShardPass
    merged: SampledStats
    local_ids: torch.Tensor  # [N] sampled id minus this shard's first column
    owned: torch.Tensor  # [N] bool: the id lies in this shard's real columns


def _sampled_forward(student_logits: torch.Tensor, teacher_logits: torch.Tensor, sampled_tokens: torch.Tensor,
                     temperature: float, real_vocab: int, tp_group, support_k: int) -> _SampledForward:
    """Reverse-KL statistics, the sampled tokens' log-ratio and (``support_k`` > 0) the support: one collective."""
    kind = resolve_divergence("reverse_kl", 0.0, temperature)
    layout = layout_logits(student_logits, teacher_logits, real_vocab, tp_group)
    shard = ShardPass.over_logits(layout.student_2d, layout.num_cols, layout.teacher_pieces, kind, temperature, 0.0)
    ids, owned = sampled_ids(sampled_tokens, layout.student_2d.shape[1], shard.num_cols, tp_group)
    if shard.num_rows == 0:
        return _SampledForward(shard, SampledStats.empty(student_logits.device), ids, owned)
    gathered = _Math.gather_token_stats(sampled_columns(shard, ids, owned, support_k), tp_group)
    return _SampledForward(shard, SampledStats.merge(gathered, shard.temperature, support_k), ids, owned)


class _SampledTokenPolicyGradient(torch.autograd.Function):
    """Value KL(p||q) per token; gradient ``g A (p - e_y) / T`` with the detached advantage A (no collective)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, sampled_tokens, real_vocab_size, tp_group, options):
        temperature = float(options.temperature)
        out = _sampled_forward(student_logits, teacher_logits, sampled_tokens, temperature, real_vocab_size,
                               tp_group, support_size(options))
        stats = out.merged.stats
        advantage = out.merged.advantage(options)
        ctx.save_for_backward(student_logits, stats.max_s, stats.log_z_s, advantage, out.local_ids, out.owned)
        ctx.num_cols, ctx.temperature = out.shard.num_cols, temperature
        return stats.loss.view(student_logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        student_logits, max_s, log_z_s, advantage, local_ids, owned = ctx.saved_tensors
        num_cols, temperature = ctx.num_cols, ctx.temperature
        student_2d = student_logits.reshape(-1, student_logits.shape[-1])
        grad_2d = torch.zeros_like(student_2d, memory_format=torch.contiguous_format)
        weight = grad_loss.reshape(-1).float() * advantage / temperature  # [N]: g A / T
        shard = ShardPass.over_logits(student_2d, num_cols, [], "reverse_kl", temperature, 0.0)
        write_policy_gradient(shard, (max_s, log_z_s), weight, local_ids, owned, grad_2d[:, :num_cols])
        return grad_2d.view(student_logits.shape), None, None, None, None, None


def sampled_token_policy_gradient(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                  sampled_tokens: torch.Tensor,
                                  options: DivergenceOptions = DivergenceOptions(divergence="vopd")) -> torch.Tensor:
    """vOPD per token: value KL(p||q), gradient the policy gradient of ``-A_t log p(y_t)`` (A detached).

    Args:
        student_logits, teacher_logits: as in ``losses.vocab_parallel_divergence`` (``[..., V/tp]`` on
            ``options.tp_group``).
        sampled_tokens: ``[...]`` global ids ``< real_vocab_size`` of the response tokens, replicated on tp_group.
        options: ``divergence`` ``vopd`` (or ``reverse_kl``, the objective it estimates); ``baseline`` ``none`` |
            ``full`` | ``top_k`` (see the module docstring) and ``top_k`` its support size; ``reward_clip``
            (lower bound on ``r_t``, None: none); ``temperature``, ``real_vocab_size``, ``tp_group``,
            ``diagnostics`` as for the divergences.
    Returns:
        ``[...]`` fp32 KL(p||q), replicated on tp_group; its gradient w.r.t. ``student_logits`` is the estimator's.
    """
    check_sampled_options(options)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.shape[:-1] != sampled_tokens.shape:
        raise ValueError(f"token shapes differ: {tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}, "
                         f"{tuple(sampled_tokens.shape)}")
    tp_group = effective_tp_group(options.tp_group)
    real_vocab = resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], options.real_vocab_size,
                                    tp_group)
    return _SampledTokenPolicyGradient.apply(student_logits, teacher_logits.detach(), sampled_tokens, real_vocab,
                                             tp_group, options)


def check_sampled_options(options: DivergenceOptions) -> None:
    """One-line errors for options the sampled-token estimator cannot run with."""
    if options.divergence not in ("vopd", "reverse_kl"):
        raise ValueError(f"the sampled-token estimator estimates reverse KL; got divergence {options.divergence!r}")
    if options.baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {options.baseline!r}")
    if options.baseline == "top_k" and options.top_k < 1:
        raise ValueError(f"top_k must be >= 1 for the top_k baseline, got {options.top_k}")


def reward_clip(options: DivergenceOptions) -> Optional[float]:
    """The lower bound on ``r_t`` as a float, or None."""
    return None if options.reward_clip is None else float(options.reward_clip)
