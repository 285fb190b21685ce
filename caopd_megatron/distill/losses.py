"""Vocab-parallel distillation divergences between a student and a teacher, with analytic backwards.

Notation: ``s = z_s / T`` and ``t = z_t / T`` are the temperature-scaled logits, ``p = softmax(s)`` (student)
and ``q = softmax(t)`` (teacher), both over the shared *real* vocabulary ``[0, R)``. Every divergence is a
per-token scalar; logits are sharded on the vocabulary dimension across the tensor-parallel (TP) group.

Design decisions:

1. Divergences. ``reverse_kl`` = KL(p||q) (default), ``forward_kl`` = KL(q||p), ``jsd`` = generalised JSD
   ``J_beta = beta * KL(q||m) + (1 - beta) * KL(p||m)`` with ``m = beta * q + (1 - beta) * p``; exactly TRL's
   GKD ``generalized_jsd_loss`` convention, including its end points: ``beta == 0`` *is* forward KL and
   ``beta == 1`` *is* reverse KL (J_beta itself tends to 0 at both ends). The limits that hold, and are
   tested numerically: ``J_beta / beta -> KL(q||p)`` as ``beta -> 0`` and ``J_beta / (1 - beta) -> KL(p||q)``
   as ``beta -> 1``, so the end points are the first-order, rescaled limits. ``beta = 0.5`` is the
   symmetric Jensen-Shannon divergence.
2. One ``torch.autograd.Function`` per divergence with an analytic backward (``T`` the temperature, ``g``
   the incoming per-token gradient):
   reverse KL ``dL/dz_s = g p (log p - log q - L) / T``; forward KL ``dL/dz_s = g (p - q) / T``;
   JSD ``dJ/dz_s = g (1 - beta) p (log p - log m - KL(p||m)) / T``.
   The teacher never receives a gradient (its logits are detached). Double backward is not supported.
3. Communication: the per-token statistics of a shard (row max, sum of exp relative to that max, and the
   KL numerator) are computed relative to the *local* row max and merged afterwards with the log-sum-exp
   rule, so KL forward needs exactly ONE collective (an all-gather of 5 fp32 scalars per token) instead of
   the usual MAX all-reduce followed by a SUM all-reduce; JSD needs two (its mixture ``m`` needs the global
   normalisers first). Backward needs none. We all-gather rather than all-reduce: the payload is a few
   scalars per token (negligible next to the logits), the log-sum-exp merge is not a plain sum, and reducing
   the gathered ``[tp, N, k]`` tensor locally in rank order makes the loss bitwise identical on every TP
   rank and independent of the collective's reduction algorithm.
4. Memory: nothing logits-sized in fp32 is kept between forward and backward. Forward reads the caller's
   shards (any float dtype) in row chunks into at most 4 reusable fp32 work buffers sized to
   ``max(WORK_BUFFER_FRACTION * shard_bytes, MIN_WORK_BYTES)``; backward recomputes ``log p``,
   ``log q`` chunk by chunk from the saved inputs and five per-token scalars. Extra peak memory is thus
   the gradient (one shard, in the student's dtype, unavoidable) plus ~1/16 shard of work buffers. The
   price: the inputs stay referenced until backward (a bf16 shard, instead of megatron's fp32 softmax)
   and backward re-reads them (one extra pass of elementwise work).
5. Padding: entries ``>= real_vocab_size`` are sliced away before any arithmetic, so they never get
   probability mass, their values (even -inf/NaN) cannot leak into the loss, and their gradient is
   exactly 0. Real entries must be finite (a -inf teacher entry where p > 0 makes reverse KL infinite, as
   the mathematics says).
6. Mismatched padded vocabularies (e.g. Qwen2.5 teacher 152064 vs student 151936). Student rank r holds
   global rows ``[r*Vs/tp, (r+1)*Vs/tp)`` and teacher rank r holds ``[r*Vt/tp, (r+1)*Vt/tp)``
   (megatron-core's ``VocabUtility.vocab_range_from_global_vocab_size``). The teacher is realigned onto
   the student's partition: each rank computes, from the sizes alone, the intersection of every rank's
   needed real range with every rank's teacher range and exchanges only the non-local intersections with
   one batched ``isend/irecv`` (for a small padding difference these are boundary slices of at most
   ``r * |Vt - Vs| / tp`` columns from a neighbour). The local intersection stays a zero-copy view, the
   received slices are separate small tensors ("pieces"), and the work-buffer loader stitches the pieces
   together while upcasting, so the teacher shard is never copied whole and the vocabulary is never
   gathered. The teacher is moved (not the student) because it needs no gradient, so nothing has to be
   sent back in backward. The fused path moves teacher *weight rows* once instead of logits per chunk.
   With NCCL, ``batch_isend_irecv`` must not be the first collective on the TP group (in megatron the
   model's forward has always used it before the loss).
7. Fused chunked path (``fused_chunked_divergence``): output-layer matmul + divergence over token chunks,
   so only one chunk of logits ever exists (padded rows of the weight are skipped: their logits are never
   computed). Backward *recomputes* each chunk's logits instead of accumulating gradients during forward:
   the per-token incoming gradient (loss mask, sequence weights) is unknown at forward time and the
   weight gradient ``sum_t g_t G_t^T h_t`` is not separable in ``g_t``, so accumulation would need the
   full ``[N, V/tp]`` logits gradient, which is what this path exists to avoid. Cost: one extra student
   and one extra teacher logit matmul per chunk. KL needs one collective for the whole forward (local
   per-chunk statistics, gathered once); JSD needs two per chunk. The student weight gradient is
   accumulated in fp32 across chunks; the student hidden gradient is all-reduced over the TP group inside
   backward (the hidden state is replicated, each rank only holds the part from its vocabulary shard), so
   the caller must not add another reduction (no ``copy_to_tensor_model_parallel_region`` in front; with
   sequence parallelism, all-gather the hidden states with an op whose backward is a plain slice, not a
   reduce-scatter). Backward skips the hidden / weight gradient work that autograd does not need.
8. All arithmetic is fp32 whatever the input dtype; the loss is fp32; gradients come back in the input's
   dtype. Log-normalisers are kept as (row max, log Z) pairs and subtracted one after the other, so
   ``log p`` stays accurate for logits of magnitude 1e4. The caller's tensors are never written to.
   Empty batches (0 tokens) return empty losses and skip the per-token collectives (every TP rank sees
   the same token count, so all ranks skip together).
9. No megatron import here: the layout rule is two lines and importing megatron costs seconds in every
   spawned worker; ``tests/test_losses.py`` checks the rule against ``VocabUtility``.
10. ``sampled_token_advantage`` (no gradient): the sampled-token estimator ``r_t - V(s_t)`` with
   ``r_t = log q(y_t) - log p(y_t)`` and the closed-form baseline ``V(s_t) = -KL(p||q)(s_t)``; it reuses
   the reverse-KL statistics pass and rides on its single all-gather (two extra columns).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from caopd_megatron.config.schema import Divergence

__all__ = [
    "DIVERGENCES",
    "vocab_parallel_divergence",
    "masked_sequence_mean",
    "fused_chunked_divergence",
    "sampled_token_advantage",
    "SampledTokenAdvantage",
    "VocabParallelDivergence",
]

DIVERGENCES = get_args(Divergence)  # the names live in the schema's ``Divergence``

# fp32 work buffers may take this fraction of the student shard's bytes; with the gradient (one shard) this
# keeps the loss's extra peak near 1.06x the shard. The floor keeps kernels reasonably large on tiny inputs.
WORK_BUFFER_FRACTION = 1.0 / 16
MIN_WORK_BYTES = 1 << 20

# A piece of realigned teacher data: columns [start, stop) of the student's local real range, backed by
# `tensor` whose vocabulary dimension has length stop - start.
Piece = Tuple[int, int, torch.Tensor]


class VocabParallelDivergence:
    """Static numeric helpers shared by the unfused, fused-chunked and sampled-token paths.

    Buffers named ``x``/``y``/``logp``/``logq`` are fp32 ``[c, n]`` work buffers of ``c`` tokens over the
    ``n`` real columns of the local shard; helpers ending in ``_`` overwrite them.
    """

    @staticmethod
    def tp_rank_and_size(tp_group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
        """(rank, size) in the TP group; ``None`` means no tensor parallelism."""
        if tp_group is None:
            return 0, 1
        return dist.get_rank(tp_group), dist.get_world_size(tp_group)

    @staticmethod
    def vocab_range(partition_size: int, rank: int) -> Tuple[int, int]:
        """Global ``[first, last)`` rows held by ``rank``; same rule as megatron-core's ``VocabUtility``."""
        return rank * partition_size, (rank + 1) * partition_size

    @staticmethod
    def real_range(partition_size: int, rank: int, real_vocab_size: int) -> Tuple[int, int]:
        """The real (non-padding) part of ``rank``'s range; empty (``last <= first``) for an all-padding shard."""
        first, last = VocabParallelDivergence.vocab_range(partition_size, rank)
        return first, max(first, min(last, real_vocab_size))

    @staticmethod
    def realign_teacher(
        teacher: torch.Tensor,
        vocab_dim: int,
        student_partition: int,
        real_vocab_size: int,
        tp_group: Optional[dist.ProcessGroup],
    ) -> list:
        """Move the teacher's real vocabulary onto the student's partition; return this rank's pieces.

        Args:
            teacher: ``[..., Vt/tp]`` logits (``vocab_dim=-1``) or ``[Vt/tp, h]`` weight (``vocab_dim=0``),
                this rank's shard on tp_group.
            student_partition: ``Vs/tp``.
        Returns:
            Sorted ``[(start, stop, tensor)]`` covering ``[0, n)``, ``n`` this rank's real student columns;
            the local intersection is a view of ``teacher``, the rest are received tensors (on tp_group).
        """
        helper = VocabParallelDivergence
        rank, world = helper.tp_rank_and_size(tp_group)
        vocab_dim = vocab_dim % teacher.dim()
        teacher_partition = teacher.shape[vocab_dim]
        need_lo, need_hi = helper.real_range(student_partition, rank, real_vocab_size)
        have_lo, have_hi = helper.real_range(teacher_partition, rank, real_vocab_size)
        pieces, ops = [], []
        for peer in range(world):
            # What this rank needs from peer's teacher shard.
            peer_lo, peer_hi = helper.real_range(teacher_partition, peer, real_vocab_size)
            lo, hi = max(need_lo, peer_lo), min(need_hi, peer_hi)
            if lo < hi:
                if peer == rank:
                    pieces.append((lo - need_lo, hi - need_lo, teacher.narrow(vocab_dim, lo - peer_lo, hi - lo)))
                else:
                    shape = list(teacher.shape)
                    shape[vocab_dim] = hi - lo
                    buf = teacher.new_empty(shape)
                    pieces.append((lo - need_lo, hi - need_lo, buf))
                    ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(tp_group, peer), tp_group))
            if peer == rank:
                continue
            # What peer needs from this rank's teacher shard.
            want_lo, want_hi = helper.real_range(student_partition, peer, real_vocab_size)
            lo, hi = max(want_lo, have_lo), min(want_hi, have_hi)
            if lo < hi:
                send = teacher.narrow(vocab_dim, lo - have_lo, hi - lo).contiguous()
                ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(tp_group, peer), tp_group))
        if ops:
            # Point-to-point exchange of the boundary slices only, batched so send/recv pairs cannot deadlock.
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        pieces.sort(key=lambda piece: piece[0])
        return pieces

    @staticmethod
    def load_scaled_(
        buf: torch.Tensor,
        pieces: Sequence[Piece],
        rows: slice,
        temperature: float,
        shifts: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """``buf[c, n]`` (fp32) <- ``logits[rows] / T - shift_1[rows] - shift_2[rows] ...``, from ``pieces``.

        The upcast happens in the copy, so a bf16 shard never exists as a whole fp32 tensor. Shifts are
        applied one at a time: ``(s - max) - log Z`` keeps log Z's precision when |s| is large, whereas
        ``s - (max + log Z)`` would round log Z to the ulp of the max (1e-3 at 1e4, i.e. 0.1% error in p).
        """
        for start, stop, src in pieces:
            buf[:, start:stop].copy_(src[rows])
        if temperature != 1.0:
            # Division (not multiplication by 1/T) matches `logits / T` in references bit for bit.
            buf.div_(temperature)
        for shift in shifts:
            buf.sub_(shift[rows].unsqueeze(-1))
        return buf

    @staticmethod
    def shift_by_row_max_(buf: torch.Tensor) -> torch.Tensor:
        """Subtract the local row max in place; return it ``[c]``."""
        row_max = buf.amax(dim=-1)
        buf.sub_(row_max.unsqueeze(-1))
        return row_max

    @staticmethod
    def kl_partial_stats_(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """Local statistics of KL(softmax(x) || softmax(y)) for one chunk; overwrites all three buffers.

        Args:
            x, y: ``[c, n]`` scaled logits (unshifted) of the distribution the expectation is over, and of
                the other one.
        Returns:
            ``[c, 5]`` = (max_x, sum exp(x - max_x), max_y, sum exp(y - max_y),
            sum exp(x - max_x) * ((x - max_x) - (y - max_y))), all local to this shard.
        """
        max_x = VocabParallelDivergence.shift_by_row_max_(x)
        max_y = VocabParallelDivergence.shift_by_row_max_(y)
        sum_y = torch.exp(y, out=scratch).sum(dim=-1)
        diff = torch.sub(x, y, out=y)
        exp_x = x.exp_()
        sum_x = exp_x.sum(dim=-1)
        numerator = diff.mul_(exp_x).sum(dim=-1)
        return torch.stack((max_x, sum_x, max_y, sum_y, numerator), dim=-1)

    @staticmethod
    def merge_log_normaliser(row_max: torch.Tensor, sum_exp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[tp, N]`` per-shard (max, sum exp(. - max)) -> global (max ``[N]``, log sum exp(. - max) ``[N]``).

        Kept as a pair (see ``load_scaled_``). All-padding shards carry (-inf, 0) and drop out (exp(-inf) = 0).
        """
        global_max = row_max.amax(dim=0)
        return global_max, torch.log((torch.exp(row_max - global_max) * sum_exp).sum(dim=0))

    @staticmethod
    def merge_kl_stats(gathered: torch.Tensor) -> Tuple[tuple, tuple, torch.Tensor]:
        """``[tp, N, 5]`` gathered ``kl_partial_stats_`` -> ((M_x, log Z_x), (M_y, log Z_y), KL), all ``[N]``.

        ``KL = E_x[(x - M_x) - (y - M_y)] - log Z_x + log Z_y`` with global maxima ``M`` and normalisers
        ``Z`` relative to them; each shard's numerator is moved from its local maxima to the global ones.
        """
        max_x, sum_x, max_y, sum_y, numerator = gathered.unbind(dim=-1)
        global_max_x = max_x.amax(dim=0)
        global_max_y = max_y.amax(dim=0)
        weight_x = torch.exp(max_x - global_max_x)
        z_x = (weight_x * sum_x).sum(dim=0)
        z_y = (torch.exp(max_y - global_max_y) * sum_y).sum(dim=0)
        shift = (max_x - global_max_x) - (max_y - global_max_y)
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
        ``log p - log m = -log(1-beta) - softplus(x)`` and ``log q - log m = -log beta - softplus(x) + x``,
        stable for any ``x`` (softplus never overflows, and p or q = 0 multiplies a finite number).
        """
        log_b, log_1mb, logit_b = VocabParallelDivergence.jsd_constants(beta)
        x = torch.sub(logq, logp, out=scratch).add_(logit_b)
        softplus_x = F.softplus(x)
        p, q = logp.exp_(), logq.exp_()
        q_term = x.sub_(softplus_x).sub_(log_b)
        p_term = softplus_x.neg_().sub_(log_1mb)
        return torch.stack((q_term.mul_(q).sum(dim=-1), p_term.mul_(p).sum(dim=-1)), dim=-1)

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
        _, world = VocabParallelDivergence.tp_rank_and_size(tp_group)
        stats = stats.contiguous()
        if world == 1:
            return stats.unsqueeze(0)
        gathered = stats.new_empty((world * stats.shape[0], stats.shape[1]))
        # torch >= 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        # The loss's only forward collective (KL): per-token scalars from every vocab shard of tp_group.
        all_gather(gathered, stats, group=tp_group)
        return gathered.view(world, *stats.shape)


_H = VocabParallelDivergence


# ----------------------------------------------------------------------------------------------------------
# Chunked passes over tokens, shared by the unfused and the fused paths. `s_pieces`/`t_pieces` address the
# student's / realigned teacher's local real columns; `rows` index their first (token) dimension.
# ----------------------------------------------------------------------------------------------------------


def _rows_per_chunk(num_rows: int, num_cols: int, reference_bytes: int, num_buffers: int) -> int:
    budget = max(WORK_BUFFER_FRACTION * reference_bytes, MIN_WORK_BYTES)
    rows = int(budget // (num_buffers * 4 * max(num_cols, 1)))
    return max(1, min(num_rows, rows))


def _work_buffers(num_buffers: int, num_rows: int, num_cols: int, reference_bytes: int, device):
    rows = _rows_per_chunk(num_rows, num_cols, reference_bytes, num_buffers)
    return rows, torch.empty((num_buffers, rows, num_cols), dtype=torch.float32, device=device)


def _chunks(num_rows: int, rows_per_chunk: int):
    for first in range(0, num_rows, rows_per_chunk):
        last = min(first + rows_per_chunk, num_rows)
        yield slice(first, last), last - first


def _kl_stats_pass(x_pieces, y_pieces, num_rows, num_cols, temperature, reference_bytes, device):
    """Local ``[num_rows, 5]`` KL statistics (see ``kl_partial_stats_``); no communication."""
    if num_cols == 0:
        empty = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, 0.0], device=device)
        return empty.expand(num_rows, 5).clone()
    stats = torch.empty((num_rows, 5), dtype=torch.float32, device=device)
    rows_per_chunk, work = _work_buffers(3, num_rows, num_cols, reference_bytes, device)
    for rows, c in _chunks(num_rows, rows_per_chunk):
        x = _H.load_scaled_(work[0, :c], x_pieces, rows, temperature)
        y = _H.load_scaled_(work[1, :c], y_pieces, rows, temperature)
        stats[rows] = _H.kl_partial_stats_(x, y, work[2, :c])
    return stats


def _lse_stats_pass(s_pieces, t_pieces, num_rows, num_cols, temperature, reference_bytes, device):
    """Local ``[num_rows, 4]`` = (max_s, sum exp_s, max_t, sum exp_t) relative to local maxima."""
    if num_cols == 0:
        empty = torch.tensor([-math.inf, 0.0, -math.inf, 0.0], device=device)
        return empty.expand(num_rows, 4).clone()
    stats = torch.empty((num_rows, 4), dtype=torch.float32, device=device)
    rows_per_chunk, work = _work_buffers(1, num_rows, num_cols, reference_bytes, device)
    for rows, c in _chunks(num_rows, rows_per_chunk):
        for column, pieces in ((0, s_pieces), (2, t_pieces)):
            buf = _H.load_scaled_(work[0, :c], pieces, rows, temperature)
            stats[rows, column] = _H.shift_by_row_max_(buf)
            stats[rows, column + 1] = buf.exp_().sum(dim=-1)
    return stats


def _jsd_stats_pass(s_pieces, t_pieces, num_rows, num_cols, temperature, beta, norm_s, norm_t,
                    reference_bytes, device):
    """Local ``[num_rows, 2]`` = (KL(q||m), KL(p||m)) partial sums given the global log-normalisers."""
    stats = torch.zeros((num_rows, 2), dtype=torch.float32, device=device)
    if num_cols == 0:
        return stats
    # 3 work buffers + the softplus temporary.
    rows_per_chunk, work = _work_buffers(4, num_rows, num_cols, reference_bytes, device)
    work = work[:3]
    for rows, c in _chunks(num_rows, rows_per_chunk):
        logp = _H.load_scaled_(work[0, :c], s_pieces, rows, temperature, norm_s)
        logq = _H.load_scaled_(work[1, :c], t_pieces, rows, temperature, norm_t)
        stats[rows] = _H.jsd_partial_stats_(logp, logq, work[2, :c], beta)
    return stats


def _grad_pass(kind, s_pieces, t_pieces, num_rows, num_cols, temperature, beta, norm_s, norm_t, aux, scale,
               out, reference_bytes):
    """Write ``dL/dz_s * g`` for the real columns into ``out`` ``[num_rows, num_cols]`` (any float dtype).

    ``norm_s``/``norm_t`` are the (max, log Z) pairs; ``aux`` is KL(p||q) for reverse KL, KL(p||m) for JSD,
    unused for forward KL; ``scale = g / T``; all per-token ``[num_rows]``.
    """
    if num_cols == 0 or num_rows == 0:
        return
    # JSD: 3 buffers + the softplus temporary.
    num_buffers = 4 if kind == "jsd" else 2
    rows_per_chunk, work = _work_buffers(num_buffers, num_rows, num_cols, reference_bytes, out.device)
    for rows, c in _chunks(num_rows, rows_per_chunk):
        logp = _H.load_scaled_(work[0, :c], s_pieces, rows, temperature, norm_s)
        logq = _H.load_scaled_(work[1, :c], t_pieces, rows, temperature, norm_t)
        if kind == "reverse_kl":
            grad = _H.reverse_kl_grad_(logp, logq, aux[rows], scale[rows])
        elif kind == "forward_kl":
            grad = _H.forward_kl_grad_(logp, logq, scale[rows])
        else:
            grad = _H.jsd_grad_(logp, logq, aux[rows], beta, scale[rows])
        out[rows].copy_(grad)


def _forward_stats(kind, s_pieces, t_pieces, num_rows, num_cols, temperature, beta, reference_bytes, device,
                   tp_group):
    """Global per-token (loss, (max_s, log Z_s), (max_t, log Z_t), aux), ``[N]`` each, same on all ranks."""
    if kind in ("reverse_kl", "forward_kl"):
        reverse = kind == "reverse_kl"
        x_pieces, y_pieces = (s_pieces, t_pieces) if reverse else (t_pieces, s_pieces)
        local = _kl_stats_pass(x_pieces, y_pieces, num_rows, num_cols, temperature, reference_bytes, device)
        norm_x, norm_y, kl = _H.merge_kl_stats(_H.gather_token_stats(local, tp_group))
        norm_s, norm_t = (norm_x, norm_y) if reverse else (norm_y, norm_x)
        return kl, norm_s, norm_t, kl
    local = _lse_stats_pass(s_pieces, t_pieces, num_rows, num_cols, temperature, reference_bytes, device)
    # JSD collective 1 of 2: per-shard (max, sum exp) of student and teacher.
    gathered = _H.gather_token_stats(local, tp_group)
    norm_s = _H.merge_log_normaliser(gathered[..., 0], gathered[..., 1])
    norm_t = _H.merge_log_normaliser(gathered[..., 2], gathered[..., 3])
    local = _jsd_stats_pass(s_pieces, t_pieces, num_rows, num_cols, temperature, beta, norm_s, norm_t,
                            reference_bytes, device)
    # JSD collective 2 of 2: per-shard KL(q||m), KL(p||m) partial sums, summed in rank order.
    kl_qm, kl_pm = _H.gather_token_stats(local, tp_group).sum(dim=0).unbind(dim=-1)
    return beta * kl_qm + (1.0 - beta) * kl_pm, norm_s, norm_t, kl_pm


# ----------------------------------------------------------------------------------------------------------
# Unfused path: one autograd.Function per divergence.
# ----------------------------------------------------------------------------------------------------------


class _Layout(NamedTuple):
    student_2d: torch.Tensor  # [N, Vs/tp]
    num_cols: int  # real columns of this student shard
    s_pieces: list
    t_pieces: list


def _prepare_logits(student_logits, teacher_logits, real_vocab_size, tp_group) -> _Layout:
    student_2d = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_2d = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    rank, _ = _H.tp_rank_and_size(tp_group)
    first, last = _H.real_range(student_2d.shape[1], rank, real_vocab_size)
    num_cols = last - first
    s_pieces = [(0, num_cols, student_2d[:, :num_cols])]
    if student_2d.shape[0] == 0:
        # Same token count on every rank: all ranks skip the realignment together.
        t_pieces = [(0, num_cols, teacher_2d.new_empty((0, num_cols)))]
    else:
        t_pieces = _H.realign_teacher(teacher_2d, -1, student_2d.shape[1], real_vocab_size, tp_group)
    return _Layout(student_2d, num_cols, s_pieces, t_pieces)


def _divergence_forward(ctx, kind, student_logits, teacher_logits, temperature, beta, real_vocab_size, tp_group):
    layout = _prepare_logits(student_logits, teacher_logits, real_vocab_size, tp_group)
    num_rows = layout.student_2d.shape[0]
    shard_bytes = layout.student_2d.numel() * layout.student_2d.element_size()
    if num_rows == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=student_logits.device)
        loss, norm_s, norm_t, aux = empty, (empty, empty), (empty, empty), empty
    else:
        loss, norm_s, norm_t, aux = _forward_stats(kind, layout.s_pieces, layout.t_pieces, num_rows,
                                                 layout.num_cols, temperature, beta, shard_bytes,
                                                 student_logits.device, tp_group)
    # Only inputs, received teacher slices and five per-token scalars: backward recomputes the rest.
    ctx.save_for_backward(student_logits, *(piece[2] for piece in layout.t_pieces), *norm_s, *norm_t, aux)
    ctx.piece_bounds = [piece[:2] for piece in layout.t_pieces]
    ctx.num_cols, ctx.temperature, ctx.beta, ctx.kind = layout.num_cols, temperature, beta, kind
    return loss.view(student_logits.shape[:-1])


def _divergence_backward(ctx, grad_loss):
    student_logits, *teacher_tensors, max_s, log_z_s, max_t, log_z_t, aux = ctx.saved_tensors
    num_cols = ctx.num_cols
    student_2d = student_logits.reshape(-1, student_logits.shape[-1])
    grad_2d = torch.empty_like(student_2d, memory_format=torch.contiguous_format)
    grad_2d[:, num_cols:].zero_()
    t_pieces = [(start, stop, tensor) for (start, stop), tensor in zip(ctx.piece_bounds, teacher_tensors)]
    scale = grad_loss.reshape(-1).float() / ctx.temperature
    _grad_pass(ctx.kind, [(0, num_cols, student_2d[:, :num_cols])], t_pieces, student_2d.shape[0], num_cols,
               ctx.temperature, ctx.beta, (max_s, log_z_s), (max_t, log_z_t), aux, scale, grad_2d[:, :num_cols],
               student_2d.numel() * student_2d.element_size())
    return grad_2d.view(student_logits.shape)


class _VocabParallelReverseKL(torch.autograd.Function):
    """Per-token KL(p||q); backward ``g p (log p - log q - L) / T``."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, real_vocab_size, tp_group):
        return _divergence_forward(ctx, "reverse_kl", student_logits, teacher_logits, temperature, 0.0,
                                   real_vocab_size, tp_group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return _divergence_backward(ctx, grad_loss), None, None, None, None


class _VocabParallelForwardKL(torch.autograd.Function):
    """Per-token KL(q||p); backward ``g (p - q) / T``."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, real_vocab_size, tp_group):
        return _divergence_forward(ctx, "forward_kl", student_logits, teacher_logits, temperature, 0.0,
                                   real_vocab_size, tp_group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return _divergence_backward(ctx, grad_loss), None, None, None, None


class _VocabParallelJSD(torch.autograd.Function):
    """Per-token generalised JSD (0 < beta < 1); backward ``g (1-beta) p (log p - log m - KL(p||m)) / T``."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, beta, real_vocab_size, tp_group):
        return _divergence_forward(ctx, "jsd", student_logits, teacher_logits, temperature, beta,
                                   real_vocab_size, tp_group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return _divergence_backward(ctx, grad_loss), None, None, None, None, None


def _resolve_divergence(divergence: str, beta: float, temperature: float) -> str:
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


def _resolve_real_vocab(student_partition, teacher_partition, real_vocab_size, tp_group) -> int:
    _, world = _H.tp_rank_and_size(tp_group)
    student_vocab, teacher_vocab = student_partition * world, teacher_partition * world
    if real_vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(f"padded vocab sizes differ (student {student_vocab}, teacher {teacher_vocab}): "
                             "pass real_vocab_size")
        return student_vocab
    if not 0 < real_vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(f"real_vocab_size={real_vocab_size} must be in (0, min({student_vocab}, {teacher_vocab})]")
    return int(real_vocab_size)


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    real_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token divergence between vocab-parallel student and teacher logits.

    Args:
        student_logits: ``[..., Vs/tp]`` rows ``[r*Vs/tp, (r+1)*Vs/tp)`` of the student's padded vocab on
            rank r of tp_group; any float dtype; receives the gradient (same dtype and shape).
        teacher_logits: ``[..., Vt/tp]`` likewise for the teacher (``Vt`` may differ from ``Vs``); detached.
        divergence: ``"reverse_kl"`` KL(p||q), ``"forward_kl"`` KL(q||p), ``"jsd"`` generalised JSD(beta)
            (beta 0 / 1 give forward / reverse KL, as in TRL's GKD).
        temperature: both distributions are ``softmax(logits / temperature)``.
        real_vocab_size: ids ``>= real_vocab_size`` are padding and get no mass and zero gradient;
            ``None`` means every entry is real (requires ``Vs == Vt``).
        tp_group: the tensor-parallel group over which the vocabulary is sharded; ``None`` = single shard.
    Returns:
        ``[...]`` fp32 per-token loss, replicated (bitwise identical) on every rank of tp_group.
    """
    kind = _resolve_divergence(divergence, beta, temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"token shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError("logits must be floating point")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    real_vocab = _resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size, tp_group)
    teacher_logits = teacher_logits.detach()
    temperature = float(temperature)
    if kind == "reverse_kl":
        return _VocabParallelReverseKL.apply(student_logits, teacher_logits, temperature, real_vocab, tp_group)
    if kind == "forward_kl":
        return _VocabParallelForwardKL.apply(student_logits, teacher_logits, temperature, real_vocab, tp_group)
    return _VocabParallelJSD.apply(student_logits, teacher_logits, temperature, float(beta), real_vocab, tp_group)


def masked_sequence_mean(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, s] loss and [b, s] 0/1 mask -> scalar: mean over each sequence's unmasked tokens, then mean over
    sequences that have at least one unmasked token; 0.0 (still differentiable, no NaN) when none do.

    Masked entries are selected away (not multiplied by 0), so a NaN/inf loss under the mask cannot leak
    into the value or the gradient. The result has the loss's dtype and device; no host synchronisation.
    """
    if per_token_loss.shape != mask.shape:
        raise ValueError(f"loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} differ")
    keep = mask.bool()
    masked = torch.where(keep, per_token_loss, torch.zeros_like(per_token_loss))
    tokens = keep.sum(dim=-1).to(per_token_loss.dtype)  # [b]
    sequence_mean = masked.sum(dim=-1) / tokens.clamp(min=1)
    has_tokens = tokens > 0
    num_sequences = has_tokens.sum().to(per_token_loss.dtype)
    return torch.where(has_tokens, sequence_mean, torch.zeros_like(sequence_mean)).sum() / num_sequences.clamp(min=1)


# ----------------------------------------------------------------------------------------------------------
# Fused output layer + divergence, chunked over tokens.
# ----------------------------------------------------------------------------------------------------------


def _chunk_logits(hidden_chunk, student_weight_real, teacher_hidden_chunk, teacher_weight_pieces):
    """Logits of one token chunk: student ``[c, n]`` and realigned teacher pieces, in the model dtype."""
    student = torch.matmul(hidden_chunk, student_weight_real.t())
    teacher = [(start, stop, torch.matmul(teacher_hidden_chunk, weight.t()))
               for start, stop, weight in teacher_weight_pieces]
    return student, teacher


class _FusedChunkedDivergence(torch.autograd.Function):
    """Output-layer matmul + divergence per token chunk; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, kind, beta, temperature,
                real_vocab_size, chunk_size, tp_group):
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # [N, h_s], replicated on tp_group
        teacher_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # [N, h_t]
        num_rows = hidden.shape[0]
        rank, _ = _H.tp_rank_and_size(tp_group)
        first, last = _H.real_range(student_weight.shape[0], rank, real_vocab_size)
        num_cols = last - first
        weight_real = student_weight[:num_cols]
        # Realign teacher weight rows once (not logits per chunk): the data moved is independent of N.
        w_pieces = _H.realign_teacher(teacher_weight, 0, student_weight.shape[0], real_vocab_size, tp_group)
        device = student_hidden.device
        # Per token: loss, max_s, log Z_s, max_t, log Z_t, aux.
        token_stats = torch.empty((6, num_rows), dtype=torch.float32, device=device)
        local_kl = torch.empty((num_rows, 5), dtype=torch.float32, device=device)
        reverse = kind == "reverse_kl"
        for rows, c in _chunks(num_rows, chunk_size):
            logits, t_logits = _chunk_logits(hidden[rows], weight_real, teacher_h[rows], w_pieces)
            s_pieces = [(0, num_cols, logits)]
            chunk_bytes = logits.numel() * logits.element_size()
            if kind == "jsd":
                # Two collectives per chunk: recomputing the matmuls for a second pass would cost more.
                loss, norm_s, norm_t, aux = _forward_stats(kind, s_pieces, t_logits, c, num_cols, temperature,
                                                           beta, chunk_bytes, device, tp_group)
                token_stats[:, rows] = torch.stack((loss, *norm_s, *norm_t, aux))
            else:
                x_pieces, y_pieces = (s_pieces, t_logits) if reverse else (t_logits, s_pieces)
                local_kl[rows] = _kl_stats_pass(x_pieces, y_pieces, c, num_cols, temperature, chunk_bytes, device)
            del logits, t_logits, s_pieces
        if kind != "jsd" and num_rows > 0:
            norm_x, norm_y, kl = _H.merge_kl_stats(_H.gather_token_stats(local_kl, tp_group))
            norm_s, norm_t = (norm_x, norm_y) if reverse else (norm_y, norm_x)
            token_stats = torch.stack((kl, *norm_s, *norm_t, kl))
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, *(p[2] for p in w_pieces),
                              *token_stats[1:])
        ctx.piece_bounds = [p[:2] for p in w_pieces]
        ctx.kind, ctx.beta, ctx.temperature, ctx.num_cols = kind, beta, temperature, num_cols
        ctx.chunk_size, ctx.tp_group = chunk_size, tp_group
        return token_stats[0].view(student_hidden.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        student_hidden, student_weight, teacher_hidden, *w_tensors, max_s, log_z_s, max_t, log_z_t, aux = (
            ctx.saved_tensors)
        w_pieces = [(start, stop, w) for (start, stop), w in zip(ctx.piece_bounds, w_tensors)]
        num_cols = ctx.num_cols
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        weight_real = student_weight[:num_cols]
        num_rows = hidden.shape[0]
        scale = grad_loss.reshape(-1).float() / ctx.temperature
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        # fp32 accumulation across chunks; weight-sized, so independent of the sequence length.
        grad_weight = (torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device)
                       if need_weight else None)
        if num_cols > 0 and (need_hidden or need_weight):
            for rows, c in _chunks(num_rows, ctx.chunk_size):
                logits, t_logits = _chunk_logits(hidden[rows], weight_real, teacher_h[rows], w_pieces)
                grad_logits = torch.empty_like(logits)  # [c, n] model dtype, as an output layer would see it
                _grad_pass(ctx.kind, [(0, num_cols, logits)], t_logits, c, num_cols, ctx.temperature, ctx.beta,
                           (max_s[rows], log_z_s[rows]), (max_t[rows], log_z_t[rows]), aux[rows], scale[rows],
                           grad_logits, logits.numel() * logits.element_size())
                del logits, t_logits
                if need_hidden:
                    torch.matmul(grad_logits, weight_real, out=grad_hidden[rows])
                if need_weight and grad_logits.dtype == torch.float32:
                    grad_weight[:num_cols].addmm_(grad_logits.t(), hidden[rows])  # no weight-sized temporary
                elif need_weight:
                    grad_weight[:num_cols] += torch.matmul(grad_logits.t(), hidden[rows])
        if need_hidden and ctx.tp_group is not None and num_rows > 0:
            # Hidden is replicated on tp_group; each rank holds the part from its vocab shard: sum them.
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return (grad_hidden.view(student_hidden.shape) if need_hidden else None,
                grad_weight.to(student_weight.dtype) if need_weight else None,
                None, None, None, None, None, None, None, None)


def fused_chunked_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    chunk_size: int = 1024,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    real_vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Output layer + ``vocab_parallel_divergence`` without materialising more than one chunk of logits.

    Args:
        student_hidden: ``[s, b, h_s]`` final hidden states (after the final norm), replicated on tp_group;
            its gradient is the full one (already summed over tp_group).
        student_weight: ``[Vs/tp, h_s]`` vocab-parallel output weight shard on tp_group.
        teacher_hidden: ``[s, b, h_t]``, replicated on tp_group; no gradient.
        teacher_weight: ``[Vt/tp, h_t]`` on tp_group; no gradient.
        chunk_size: tokens per chunk (the last chunk may be shorter).
        divergence, beta, temperature, real_vocab_size, tp_group: as in ``vocab_parallel_divergence``.
    Returns:
        ``[s, b]`` fp32 per-token loss, identical on every rank of tp_group; equal (up to matmul rounding)
        to ``vocab_parallel_divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)``.
    """
    kind = _resolve_divergence(divergence, beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"token shapes differ: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    real_vocab = _resolve_real_vocab(student_weight.shape[0], teacher_weight.shape[0], real_vocab_size, tp_group)
    return _FusedChunkedDivergence.apply(student_hidden, student_weight, teacher_hidden.detach(),
                                         teacher_weight.detach(), kind, float(beta), float(temperature),
                                         real_vocab, int(chunk_size), tp_group)


# ----------------------------------------------------------------------------------------------------------
# Sampled-token estimator with the closed-form per-token baseline.
# ----------------------------------------------------------------------------------------------------------


class SampledTokenAdvantage(NamedTuple):
    """Per-token fp32 tensors ``[...]``, identical on every rank of tp_group, no gradient."""

    advantage: torch.Tensor  # r_t - V(s_t) = log q(y_t) - log p(y_t) + KL(p||q)(s_t)
    log_ratio: torch.Tensor  # r_t = log q(y_t) - log p(y_t)
    reverse_kl: torch.Tensor  # KL(p||q)(s_t) = -V(s_t)


def _owned_values(pieces, local_ids, owned):
    """Value at column ``local_ids`` of the stitched pieces, 0 where not ``owned`` ``[N]`` (fp32)."""
    values = torch.zeros(local_ids.shape, dtype=torch.float32, device=local_ids.device)
    for start, stop, src in pieces:
        inside = owned & (local_ids >= start) & (local_ids < stop)
        index = (local_ids - start).clamp(0, max(stop - start - 1, 0)).unsqueeze(-1)
        picked = src.gather(-1, index).squeeze(-1).float() if stop > start else values
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
    _resolve_divergence("reverse_kl", 0.0, temperature)
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    real_vocab = _resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], real_vocab_size, tp_group)
    layout = _prepare_logits(student_logits, teacher_logits, real_vocab, tp_group)
    num_rows, num_cols = layout.student_2d.shape[0], layout.num_cols
    shape = student_logits.shape[:-1]
    if num_rows == 0:
        empty = torch.zeros(shape, dtype=torch.float32, device=student_logits.device)
        return SampledTokenAdvantage(empty, empty.clone(), empty.clone())
    rank, _ = _H.tp_rank_and_size(tp_group)
    ids = sampled_tokens.reshape(-1).to(torch.long) - rank * layout.student_2d.shape[1]
    owned = (ids >= 0) & (ids < num_cols)
    local = torch.cat((
        _kl_stats_pass(layout.s_pieces, layout.t_pieces, num_rows, num_cols, float(temperature),
                       layout.student_2d.numel() * layout.student_2d.element_size(), student_logits.device),
        _owned_values(layout.s_pieces, ids, owned).unsqueeze(-1),
        _owned_values(layout.t_pieces, ids, owned).unsqueeze(-1)), dim=-1)
    gathered = _H.gather_token_stats(local, tp_group)
    (max_s, log_z_s), (max_t, log_z_t), kl = _H.merge_kl_stats(gathered[..., :5])
    # Exactly one rank owns each id, the others add zeros, so the sum is the owner's value.
    sampled_s, sampled_t = (gathered[..., 5:].sum(dim=0) / float(temperature)).unbind(dim=-1)
    log_ratio = ((sampled_t - max_t) - log_z_t) - ((sampled_s - max_s) - log_z_s)
    return SampledTokenAdvantage((log_ratio + kl).view(shape), log_ratio.view(shape), kl.view(shape))
