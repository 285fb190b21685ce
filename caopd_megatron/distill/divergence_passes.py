"""Chunked passes over one rank's tokens, shared by the unfused, fused and sampled-token losses.

Design decisions:
- A ``ShardPass`` names what every pass reads: the divergence, the student's and the realigned teacher's
  pieces over this rank's ``n`` real columns of ``[N, V/tp]`` (on the TP group), the temperature, beta, and
  the student shard's size, which sizes the work buffers. Its passes return per-token statistics; only
  ``forward`` communicates (one all-gather for KL, two for JSD), ``write_grad`` never does.
- Memory: nothing logits-sized in fp32 is kept between forward and backward. Each pass reads the caller's
  pieces (any float dtype) in row chunks into at most 4 reusable fp32 work buffers sized to
  ``max(WORK_BUFFER_FRACTION * shard_bytes, MIN_WORK_BYTES)``; backward recomputes ``log p``, ``log q``
  chunk by chunk from the saved inputs and five per-token scalars (``TokenStats``). Extra peak memory is
  the gradient (one shard, unavoidable) plus ~1/16 shard of buffers; the price is that the inputs stay
  referenced until backward and are re-read there.
- Empty shards (0 real columns) contribute neutral statistics ((-inf, 0) normalisers, zero sums) and empty
  batches (0 tokens) skip the collectives; every TP rank sees the same token count, so all skip together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from caopd_megatron.distill.divergence_math import VocabParallelDivergence as _Math
from caopd_megatron.distill.vocab_realign import Piece

# fp32 work buffers may take this fraction of the student shard's bytes; with the gradient (one shard) this
# keeps the loss's extra peak near 1.06x the shard. The floor keeps kernels reasonably large on tiny inputs.
WORK_BUFFER_FRACTION = 1.0 / 16
MIN_WORK_BYTES = 1 << 20


def rows_per_chunk(num_rows: int, num_cols: int, reference_bytes: int, num_buffers: int) -> int:
    """Token rows per work chunk so that ``num_buffers`` fp32 ``[rows, num_cols]`` buffers fit the budget."""
    budget = max(WORK_BUFFER_FRACTION * reference_bytes, MIN_WORK_BYTES)
    rows = int(budget // (num_buffers * 4 * max(num_cols, 1)))
    return max(1, min(num_rows, rows))


def token_chunks(num_rows: int, chunk_rows: int) -> Iterator[Tuple[slice, int]]:
    """``(rows, count)`` for consecutive chunks of at most ``chunk_rows`` tokens."""
    for first in range(0, num_rows, chunk_rows):
        last = min(first + chunk_rows, num_rows)
        yield slice(first, last), last - first


class TokenStats(NamedTuple):
    """Per-token ``[N]`` fp32 results of a forward pass, identical on every rank of the TP group.

    ``aux`` is KL(p||q) for reverse KL, KL(q||p) for forward KL (unused by its gradient), KL(p||m) for JSD.
    """

    loss: torch.Tensor
    max_s: torch.Tensor
    log_z_s: torch.Tensor
    max_t: torch.Tensor
    log_z_t: torch.Tensor
    aux: torch.Tensor

    @staticmethod
    def empty(device: torch.device) -> "TokenStats":
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return TokenStats(empty, empty, empty, empty, empty, empty)

    @staticmethod
    def from_kl(gathered: torch.Tensor, kind: str, temperature: float) -> "TokenStats":
        """``[tp, N, 5]`` gathered ``ShardPass.kl_stats`` of a KL divergence -> its token statistics."""
        norm_x, norm_y, kl = _Math.merge_kl_stats(gathered, temperature)
        norm_s, norm_t = (norm_x, norm_y) if kind == "reverse_kl" else (norm_y, norm_x)
        return TokenStats(kl, *norm_s, *norm_t, kl)


@dataclass(frozen=True)
class ShardPass:
    """One rank's inputs to the chunked passes over ``num_rows`` tokens and its ``num_cols`` real columns."""

    kind: str  # reverse_kl | forward_kl | jsd (already resolved)
    student: Sequence[Piece]  # covering [0, num_cols) of [num_rows, Vs/tp]
    teacher: Sequence[Piece]  # realigned teacher covering [0, num_cols)
    num_rows: int
    num_cols: int
    temperature: float
    beta: float
    reference_bytes: int  # bytes of the student shard: sizes the work buffers
    device: torch.device

    @staticmethod
    def over_logits(student_2d: torch.Tensor, num_cols: int, teacher: Sequence[Piece], kind: str,
                    temperature: float, beta: float) -> "ShardPass":
        """The pass over student logits ``[N, >= num_cols]`` (real columns first) and the realigned teacher."""
        return ShardPass(kind=kind, student=[(0, num_cols, student_2d[:, :num_cols])], teacher=teacher,
                         num_rows=student_2d.shape[0], num_cols=num_cols, temperature=temperature, beta=beta,
                         reference_bytes=student_2d.numel() * student_2d.element_size(), device=student_2d.device)

    def _work_buffers(self, num_buffers: int) -> Tuple[int, torch.Tensor]:
        rows = rows_per_chunk(self.num_rows, self.num_cols, self.reference_bytes, num_buffers)
        return rows, torch.empty((num_buffers, rows, self.num_cols), dtype=torch.float32, device=self.device)

    def kl_stats(self) -> torch.Tensor:
        """Local ``[num_rows, 5]`` statistics of the KL (see ``kl_partial_stats_``); no communication."""
        if self.num_cols == 0:
            empty = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, 0.0], device=self.device)
            return empty.expand(self.num_rows, 5).clone()
        x_pieces, y_pieces = (self.student, self.teacher) if self.kind == "reverse_kl" else (self.teacher, self.student)
        stats = torch.empty((self.num_rows, 5), dtype=torch.float32, device=self.device)
        chunk_rows, work = self._work_buffers(3)
        for rows, c in token_chunks(self.num_rows, chunk_rows):
            x = _Math.load_(work[0, :c], x_pieces, rows)
            y = _Math.load_(work[1, :c], y_pieces, rows)
            stats[rows] = _Math.kl_partial_stats_(x, y, work[2, :c], self.temperature)
        return stats

    def lse_stats(self) -> torch.Tensor:
        """Local ``[num_rows, 4]`` = (max_s, sum exp_s, max_t, sum exp_t) relative to local maxima."""
        if self.num_cols == 0:
            empty = torch.tensor([-math.inf, 0.0, -math.inf, 0.0], device=self.device)
            return empty.expand(self.num_rows, 4).clone()
        stats = torch.empty((self.num_rows, 4), dtype=torch.float32, device=self.device)
        chunk_rows, work = self._work_buffers(1)
        for rows, c in token_chunks(self.num_rows, chunk_rows):
            for column, pieces in ((0, self.student), (2, self.teacher)):
                buf = _Math.load_(work[0, :c], pieces, rows)
                stats[rows, column] = _Math.shift_by_row_max_(buf)
                stats[rows, column + 1] = _Math.scale_(buf, self.temperature).exp_().sum(dim=-1)
        return stats

    def jsd_stats(self, norm_s: Tuple[torch.Tensor, torch.Tensor],
                  norm_t: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Local ``[num_rows, 2]`` = (KL(q||m), KL(p||m)) partial sums given the global (max, log Z) pairs."""
        stats = torch.zeros((self.num_rows, 2), dtype=torch.float32, device=self.device)
        if self.num_cols == 0:
            return stats
        # 3 work buffers + the softplus temporary.
        chunk_rows, work = self._work_buffers(4)
        work = work[:3]
        for rows, c in token_chunks(self.num_rows, chunk_rows):
            logp = _Math.load_log_probs_(work[0, :c], self.student, rows, self.temperature, *norm_s)
            logq = _Math.load_log_probs_(work[1, :c], self.teacher, rows, self.temperature, *norm_t)
            stats[rows] = _Math.jsd_partial_stats_(logp, logq, work[2, :c], self.beta)
        return stats

    def forward(self, tp_group: Optional[dist.ProcessGroup]) -> TokenStats:
        """Global per-token statistics, the same on all ranks of tp_group (1 collective for KL, 2 for JSD)."""
        if self.kind != "jsd":
            return TokenStats.from_kl(_Math.gather_token_stats(self.kl_stats(), tp_group), self.kind, self.temperature)
        # JSD collective 1 of 2: per-shard (max, sum exp) of student and teacher.
        gathered = _Math.gather_token_stats(self.lse_stats(), tp_group)
        norm_s = _Math.merge_log_normaliser(gathered[..., 0], gathered[..., 1], self.temperature)
        norm_t = _Math.merge_log_normaliser(gathered[..., 2], gathered[..., 3], self.temperature)
        # JSD collective 2 of 2: per-shard KL(q||m), KL(p||m) partial sums, summed in rank order.
        kl_qm, kl_pm = _Math.gather_token_stats(self.jsd_stats(norm_s, norm_t), tp_group).sum(dim=0).unbind(dim=-1)
        return TokenStats(self.beta * kl_qm + (1.0 - self.beta) * kl_pm, *norm_s, *norm_t, kl_pm)

    def write_grad(self, norm_s: Tuple[torch.Tensor, torch.Tensor], norm_t: Tuple[torch.Tensor, torch.Tensor],
                   aux: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
        """``out[num_rows, num_cols]`` (any float dtype) <- ``dL/dz_s * g`` for the real columns; no communication.

        ``norm_s``/``norm_t`` (max, log Z) and ``aux`` are the forward's ``TokenStats`` of these tokens;
        ``scale = g / T``; all ``[num_rows]``.
        """
        if self.num_cols == 0 or self.num_rows == 0:
            return
        # JSD: 3 buffers + the softplus temporary.
        chunk_rows, work = self._work_buffers(4 if self.kind == "jsd" else 2)
        for rows, c in token_chunks(self.num_rows, chunk_rows):
            logp = _Math.load_log_probs_(work[0, :c], self.student, rows, self.temperature, *norm_s)
            logq = _Math.load_log_probs_(work[1, :c], self.teacher, rows, self.temperature, *norm_t)
            if self.kind == "reverse_kl":
                grad = _Math.reverse_kl_grad_(logp, logq, aux[rows], scale[rows])
            elif self.kind == "forward_kl":
                grad = _Math.forward_kl_grad_(logp, logq, scale[rows])
            else:
                grad = _Math.jsd_grad_(logp, logq, aux[rows], self.beta, scale[rows])
            out[rows].copy_(grad)
