"""Where each vocabulary row lives under tensor parallelism, and moving the teacher's rows onto the student's.

Design decisions:
- Layout rule: rank r of the TP group holds global rows ``[r * V/tp, (r + 1) * V/tp)`` of a padded vocabulary
  ``V`` (megatron-core's ``VocabUtility.vocab_range_from_global_vocab_size``; ``tests/test_losses.py`` checks
  the two agree). Rows ``>= real_vocab_size`` are padding: they are sliced away before any arithmetic, so
  their values (even -inf/NaN) never reach a loss and their gradient is exactly 0. No megatron import here:
  the rule is two lines and importing megatron costs seconds in every spawned worker.
- Mismatched padded vocabularies (e.g. Qwen2.5 teacher 152064 vs student 151936): ``realign_teacher``
  computes, from the sizes alone, the intersection of every rank's needed real range with every rank's
  teacher range and exchanges only the non-local intersections with one batched ``isend/irecv`` (boundary
  slices of at most ``r * |Vt - Vs| / tp`` columns from a neighbour). The local intersection stays a
  zero-copy view; received slices are separate small tensors ("pieces") that the loss's loader stitches
  together while upcasting, so the teacher shard is never copied whole and the vocabulary never gathered.
- The teacher is moved, not the student: it needs no gradient, so nothing is sent back in backward. The
  fused path moves teacher *weight rows* once instead of logits per chunk. With NCCL,
  ``batch_isend_irecv`` must not be the first collective on the TP group (in megatron the model's forward
  has always used the group before the loss).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

# A piece of realigned data: columns [start, stop) of the student's local real range, backed by `tensor`
# whose vocabulary dimension has length stop - start.
Piece = Tuple[int, int, torch.Tensor]


def tp_rank_and_size(tp_group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(rank, size) in the TP group; ``None`` means no tensor parallelism."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def effective_tp_group(tp_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """``tp_group``, or ``None`` when it has a single rank (no communication needed)."""
    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        return None
    return tp_group


def vocab_range(partition_size: int, rank: int) -> Tuple[int, int]:
    """Global ``[first, last)`` rows held by ``rank``; same rule as megatron-core's ``VocabUtility``."""
    return rank * partition_size, (rank + 1) * partition_size


def real_range(partition_size: int, rank: int, real_vocab_size: int) -> Tuple[int, int]:
    """The real (non-padding) part of ``rank``'s range; empty (``last <= first``) for an all-padding shard."""
    first, last = vocab_range(partition_size, rank)
    return first, max(first, min(last, real_vocab_size))


def resolve_real_vocab(student_partition: int, teacher_partition: int, real_vocab_size: Optional[int],
                       tp_group: Optional[dist.ProcessGroup]) -> int:
    """The real vocabulary size, validated against both padded sizes (``partition * tp``)."""
    _, world = tp_rank_and_size(tp_group)
    student_vocab, teacher_vocab = student_partition * world, teacher_partition * world
    if real_vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(f"padded vocab sizes differ (student {student_vocab}, teacher {teacher_vocab}): "
                             "pass real_vocab_size")
        return student_vocab
    if not 0 < real_vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(f"real_vocab_size={real_vocab_size} must be in (0, min({student_vocab}, {teacher_vocab})]")
    return int(real_vocab_size)


def realign_teacher(
    teacher: torch.Tensor,
    vocab_dim: int,
    student_partition: int,
    real_vocab_size: int,
    tp_group: Optional[dist.ProcessGroup],
) -> list[Piece]:
    """Move the teacher's real vocabulary onto the student's partition; return this rank's pieces.

    Args:
        teacher: ``[..., Vt/tp]`` logits (``vocab_dim=-1``) or ``[Vt/tp, h]`` weight (``vocab_dim=0``),
            this rank's shard on tp_group.
        student_partition: ``Vs/tp``.
    Returns:
        Sorted ``[(start, stop, tensor)]`` covering ``[0, n)``, ``n`` this rank's real student columns;
        the local intersection is a view of ``teacher``, the rest are received tensors (on tp_group).
    """
    rank, world = tp_rank_and_size(tp_group)
    vocab_dim = vocab_dim % teacher.dim()
    teacher_partition = teacher.shape[vocab_dim]
    need_lo, need_hi = real_range(student_partition, rank, real_vocab_size)
    have_lo, have_hi = real_range(teacher_partition, rank, real_vocab_size)
    pieces, ops = [], []
    for peer in range(world):
        # What this rank needs from peer's teacher shard.
        peer_lo, peer_hi = real_range(teacher_partition, peer, real_vocab_size)
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
        want_lo, want_hi = real_range(student_partition, peer, real_vocab_size)
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


class LogitsLayout(NamedTuple):
    """A rank's student logits as ``[N, Vs/tp]`` and the teacher's realigned onto its real columns (tp_group)."""

    student_2d: torch.Tensor  # [N, Vs/tp]
    num_cols: int  # real columns of this student shard (the first ones)
    teacher_pieces: list[Piece]  # realigned teacher covering [0, num_cols)


def layout_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, real_vocab_size: int,
                  tp_group: Optional[dist.ProcessGroup]) -> LogitsLayout:
    """Flatten ``[..., V/tp]`` logits to tokens and realign the teacher onto the student's real columns."""
    student_2d = student_logits.reshape(-1, student_logits.shape[-1])
    teacher_2d = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    rank, _ = tp_rank_and_size(tp_group)
    first, last = real_range(student_2d.shape[1], rank, real_vocab_size)
    num_cols = last - first
    if student_2d.shape[0] == 0:
        # Same token count on every rank: all ranks skip the realignment together.
        teacher_pieces = [(0, num_cols, teacher_2d.new_empty((0, num_cols)))]
    else:
        teacher_pieces = realign_teacher(teacher_2d, -1, student_2d.shape[1], real_vocab_size, tp_group)
    return LogitsLayout(student_2d, num_cols, teacher_pieces)
