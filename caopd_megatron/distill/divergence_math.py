"""Divergence math: the pure numeric steps shared by the unfused, fused and sampled-token losses.

Notation: ``s = z_s / T`` and ``t = z_t / T`` are the temperature-scaled logits, ``p = softmax(s)`` (student)
and ``q = softmax(t)`` (teacher), both over the shared *real* vocabulary. Every divergence is a per-token
scalar; logits are sharded on the vocabulary dimension across the tensor-parallel (TP) group.

Design decisions:
- Divergences: ``reverse_kl`` = KL(p||q) (default), ``forward_kl`` = KL(q||p), ``jsd`` = generalised JSD
  ``J_beta = beta KL(q||m) + (1 - beta) KL(p||m)``, ``m = beta q + (1 - beta) p``: TRL's GKD convention,
  end points included (``beta == 0`` *is* forward KL, ``beta == 1`` reverse KL; ``J_beta / beta`` and
  ``J_beta / (1 - beta)`` tend to them, tested). Analytic gradients (``g`` the incoming per-token gradient):
  reverse KL ``g p (log p - log q - L) / T``; forward KL ``g (p - q) / T``;
  JSD ``g (1 - beta) p (log p - log m - KL(p||m)) / T``. The teacher never receives a gradient.
- One collective for KL: each shard's statistics (row max, sum exp relative to it, KL numerator) are local
  and merged afterwards with the log-sum-exp rule from one all-gather of a few fp32 scalars per token; the
  gathered ``[tp, N, k]`` tensor is reduced locally in rank order, so the loss is bitwise identical on every
  TP rank. JSD needs two (its mixture needs the global normalisers first).
- fp32 arithmetic. Log-normalisers are (raw row max, log Z) pairs: the max is subtracted *before* dividing
  by T and log Z after, so ``log p`` stays accurate for logits of magnitude 1e4 at any temperature.
  Helpers ending in ``_`` overwrite their ``[c, n]`` fp32 work buffers (``c`` tokens, ``n`` real columns
  of the local shard), never the caller's tensors.
- Masked vocabularies: a -inf logit is read as ``MASKED_LOGIT`` (below), so every divergence is finite.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F

from caopd_megatron.config.schema import Divergence
from caopd_megatron.distill.vocab_realign import Piece, tp_rank_and_size

DIVERGENCES = get_args(Divergence)  # the names live in the schema's ``Divergence``

# A -inf logit (a masked vocabulary entry, e.g. a teacher under constrained decoding) is read as this value.
# exp underflows to exactly 0 in fp32 for anything ~104 T below the row max, so forward KL and JSD equal
# their 0 log 0 = 0 limits; reverse KL stays finite: student mass p on a masked teacher token costs
# p (log p + (M - MASKED_LOGIT) / T + log Z) with M the teacher's max logit -- a steep, finite penalty whose
# gradient moves that mass away (mathematically KL(p||q) is +inf there, which no optimiser can use).
MASKED_LOGIT = -1.0e4


def resolve_divergence(divergence: str, beta: float, temperature: float) -> str:
    """Validate the arguments; return the divergence actually computed (JSD's end points are the KLs)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence != "jsd":
        return divergence
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    # TRL's GKD end points: the rescaled limits of J_beta (see the module docstring).
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(beta), "jsd")


class VocabParallelDivergence:
    """Static numeric helpers shared by the unfused, fused-chunked and sampled-token paths.

    Buffers named ``x``/``y``/``logp``/``logq`` are fp32 ``[c, n]`` work buffers of ``c`` tokens over the
    ``n`` real columns of the local shard; helpers ending in ``_`` overwrite them.
    """

    @staticmethod
    def load_(buf: torch.Tensor, pieces: Sequence[Piece], rows: slice) -> torch.Tensor:
        """``buf[c, n]`` (fp32) <- ``logits[rows]`` from ``pieces``, a masked (-inf) entry read as ``MASKED_LOGIT``.

        The upcast happens in the copy, so a bf16 shard never exists as a whole fp32 tensor.
        """
        for start, stop, src in pieces:
            buf[:, start:stop].copy_(src[rows])
        return VocabParallelDivergence.unmask_(buf)

    @staticmethod
    def unmask_(logits: torch.Tensor) -> torch.Tensor:
        """Replace -inf by ``MASKED_LOGIT`` in place (NaN and +inf stay what they are)."""
        return logits.nan_to_num_(nan=math.nan, posinf=math.inf, neginf=MASKED_LOGIT)

    @staticmethod
    def scale_(logit_difference: torch.Tensor, temperature: float) -> torch.Tensor:
        """``d / T`` in place, for a difference of raw logits (untouched when T = 1)."""
        if temperature == 1.0:
            return logit_difference
        # Division (not multiplication by 1/T) matches `logits / T` in references bit for bit.
        return logit_difference.div_(temperature)

    @staticmethod
    def load_log_probs_(
        buf: torch.Tensor,
        pieces: Sequence[Piece],
        rows: slice,
        temperature: float,
        row_max: torch.Tensor,
        log_z: torch.Tensor,
    ) -> torch.Tensor:
        """``buf[c, n]`` <- ``(logits[rows] - max[rows]) / T - log Z[rows]``: log-probabilities.

        ``row_max`` (raw logit units) and ``log_z`` (scaled units) are the global normaliser pair ``[N]``.
        Subtracting the max before dividing by T keeps the precision of logits of magnitude 1e4 (dividing
        first rounds each to the ulp of z / T). Shifts are applied one at a time: ``(s - max) - log Z`` keeps
        log Z's precision, whereas ``s - (max + log Z)`` would round it to the ulp of the max.
        """
        VocabParallelDivergence.load_(buf, pieces, rows)
        buf.sub_(row_max[rows].unsqueeze(-1))
        VocabParallelDivergence.scale_(buf, temperature)
        return buf.sub_(log_z[rows].unsqueeze(-1))

    @staticmethod
    def shift_by_row_max_(buf: torch.Tensor) -> torch.Tensor:
        """Subtract the local row max in place; return it ``[c]``."""
        row_max = buf.amax(dim=-1)
        buf.sub_(row_max.unsqueeze(-1))
        return row_max

    @staticmethod
    def kl_partial_stats_(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor, temperature: float) -> torch.Tensor:
        """Local statistics of KL(softmax(x / T) || softmax(y / T)) for one chunk; overwrites all three buffers.

        Args:
            x, y: ``[c, n]`` raw logits of the distribution the expectation is over, and of the other one.
        Returns:
            ``[c, 5]`` = (max_x, sum exp(x' - max_x'), max_y, sum exp(y' - max_y'),
            sum exp(x' - max_x') * ((x' - max_x') - (y' - max_y'))), with ``x' = x / T``, all local to this
            shard; the maxima are in raw logit units (see ``merge_kl_stats``).
        """
        max_x = VocabParallelDivergence.shift_by_row_max_(x)
        max_y = VocabParallelDivergence.shift_by_row_max_(y)
        VocabParallelDivergence.scale_(x, temperature)
        VocabParallelDivergence.scale_(y, temperature)
        sum_y = torch.exp(y, out=scratch).sum(dim=-1)
        diff = torch.sub(x, y, out=y)
        exp_x = x.exp_()
        sum_x = exp_x.sum(dim=-1)
        numerator = diff.mul_(exp_x).sum(dim=-1)
        return torch.stack((max_x, sum_x, max_y, sum_y, numerator), dim=-1)

    @staticmethod
    def merge_log_normaliser(row_max: torch.Tensor, sum_exp: torch.Tensor,
                             temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[tp, N]`` per-shard (raw max, sum exp((. - max) / T)) -> global (raw max, log sum exp), ``[N]`` each.

        Kept as a pair (see ``load_log_probs_``). All-padding shards carry (-inf, 0) and drop out.
        """
        global_max = row_max.amax(dim=0)
        scale_ = VocabParallelDivergence.scale_
        return global_max, torch.log((torch.exp(scale_(row_max - global_max, temperature)) * sum_exp).sum(dim=0))

    @staticmethod
    def merge_kl_stats(gathered: torch.Tensor, temperature: float) -> Tuple[tuple, tuple, torch.Tensor]:
        """``[tp, N, 5]`` gathered ``kl_partial_stats_`` -> ((M_x, log Z_x), (M_y, log Z_y), KL), all ``[N]``.

        ``KL = E_x[(x - M_x) / T - (y - M_y) / T] - log Z_x + log Z_y`` with global raw maxima ``M`` and
        normalisers ``Z`` relative to them; each shard's numerator is moved from its local maxima to the global ones.
        """
        scale_ = VocabParallelDivergence.scale_
        max_x, sum_x, max_y, sum_y, numerator = gathered.unbind(dim=-1)
        global_max_x = max_x.amax(dim=0)
        global_max_y = max_y.amax(dim=0)
        offset_x = scale_(max_x - global_max_x, temperature)
        offset_y = scale_(max_y - global_max_y, temperature)
        weight_x = torch.exp(offset_x)
        z_x = (weight_x * sum_x).sum(dim=0)
        z_y = (torch.exp(offset_y) * sum_y).sum(dim=0)
        shift = offset_x - offset_y
        # An all-padding shard has max = -inf, hence shift = NaN; its contribution is exactly zero.
        term = torch.where(sum_x > 0, weight_x * (numerator + shift * sum_x), torch.zeros_like(sum_x))
        log_z_x, log_z_y = torch.log(z_x), torch.log(z_y)
        kl = term.sum(dim=0) / z_x - log_z_x + log_z_y
        return (global_max_x, log_z_x), (global_max_y, log_z_y), kl

    @staticmethod
    def jsd_constants(beta: float) -> Tuple[float, float, float]:
        """(log beta, log(1 - beta), log(beta / (1 - beta))) for 0 < beta < 1."""
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
        return log_b, log_1mb, log_b - log_1mb

    @staticmethod
    def jsd_partial_stats_(logp: torch.Tensor, logq: torch.Tensor, scratch: torch.Tensor, beta: float) -> torch.Tensor:
        """Local sums (KL(q||m), KL(p||m)) ``[c, 2]`` from normalised log-probs; overwrites the buffers.

        With ``x = log q - log p + log(beta/(1-beta))`` the mixture is handled without forming ``m``:
        ``log p - log m = -log(1-beta) - softplus(x)`` and ``log q - log m = -log beta - softplus(-x)``, stable
        for any finite ``x`` (softplus never overflows). The second is not written ``x - softplus(x)``: that
        cancels catastrophically as beta -> 1, where x ~ log(beta / (1 - beta)) is large.
        """
        log_b, log_1mb, logit_b = VocabParallelDivergence.jsd_constants(beta)
        x = torch.sub(logq, logp, out=scratch).add_(logit_b)
        p_sum = F.softplus(x).neg_().sub_(log_1mb).mul_(logp.exp_()).sum(dim=-1)
        q_sum = F.softplus(x.neg_()).neg_().sub_(log_b).mul_(logq.exp_()).sum(dim=-1)
        return torch.stack((q_sum, p_sum), dim=-1)

    @staticmethod
    def reverse_kl_grad_(logp: torch.Tensor, logq: torch.Tensor, kl: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale * p * (log p - log q - KL)`` ``[c, n]`` (into ``logq``); ``kl``, ``scale`` are ``[c]``."""
        grad = torch.sub(logp, logq, out=logq).sub_(kl.unsqueeze(-1))
        return grad.mul_(logp.exp_()).mul_(scale.unsqueeze(-1))

    @staticmethod
    def forward_kl_grad_(logp: torch.Tensor, logq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale * (p - q)`` ``[c, n]`` (into ``logp``)."""
        return logp.exp_().sub_(logq.exp_()).mul_(scale.unsqueeze(-1))

    @staticmethod
    def jsd_grad_(
        logp: torch.Tensor, logq: torch.Tensor, kl_pm: torch.Tensor, beta: float, scale: torch.Tensor
    ) -> torch.Tensor:
        """``scale * (1 - beta) * p * (log p - log m - KL(p||m))`` ``[c, n]`` (new tensor); overwrites inputs."""
        _, log_1mb, logit_b = VocabParallelDivergence.jsd_constants(beta)
        x = torch.sub(logq, logp, out=logq).add_(logit_b)
        grad = F.softplus(x).neg_().sub_(log_1mb).sub_(kl_pm.unsqueeze(-1))
        return grad.mul_(logp.exp_()).mul_((scale * (1.0 - beta)).unsqueeze(-1))

    @staticmethod
    def gather_token_stats(stats: torch.Tensor, tp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        """``[N, k]`` local per-token statistics -> ``[tp, N, k]`` from every rank of tp_group."""
        _, world = tp_rank_and_size(tp_group)
        stats = stats.contiguous()
        if world == 1:
            return stats.unsqueeze(0)
        gathered = stats.new_empty((world * stats.shape[0], stats.shape[1]))
        # torch >= 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        # The loss's only forward collective (KL): per-token scalars from every vocab shard of tp_group.
        all_gather(gathered, stats, group=tp_group)
        return gathered.view(world, *stats.shape)
