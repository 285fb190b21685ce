"""The output layer fused with the distillation divergence, chunked over tokens.

Design decisions:
- Only one chunk of logits ever exists: ``fused_chunked_divergence`` multiplies a token chunk's hidden states
  by the output weights and feeds the logits to the chunked passes of ``divergence_passes``. Padded rows of
  the weight are skipped (their logits are never computed); the teacher's weight *rows* are realigned onto
  the student's partition once (``vocab_realign``), independent of the token count.
- Backward recomputes each chunk's logits instead of accumulating gradients in forward: the per-token
  incoming gradient (loss mask, sequence weights) is unknown at forward time and the weight gradient
  ``sum_t g_t G_t^T h_t`` is not separable in ``g_t``, so accumulation would need the full ``[N, V/tp]``
  logits gradient this path exists to avoid. Cost: one extra student and teacher logit matmul per chunk.
- Collectives: KL, mixed and vOPD need one for the whole forward (local per-chunk statistics, gathered
  once; vOPD's carry the sampled token's logits, ``sampled_token.sampled_columns``); JSD two per chunk.
  The student weight gradient is accumulated in fp32 across chunks; the hidden gradient is all-reduced
  over the TP group inside backward (the hidden state is replicated, each rank holds the part from its
  vocabulary shard), so the caller must not add another reduction (no
  ``copy_to_tensor_model_parallel_region`` in front; with sequence parallelism, all-gather the hidden states
  with an op whose backward is a plain slice). Backward skips the gradient work autograd does not need.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from caopd_megatron.distill.divergence_math import VocabParallelDivergence as _Math
from caopd_megatron.distill.divergence_math import resolve_divergence
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.divergence_passes import ShardPass, TokenStats, token_chunks
from caopd_megatron.distill.sampled_token import (
    SampledStats,
    check_sampled_options,
    sampled_columns,
    sampled_ids,
    support_size,
    write_policy_gradient,
)
from caopd_megatron.distill.token_diagnostics import local_columns, merge_columns, num_columns
from caopd_megatron.distill.vocab_realign import (
    effective_tp_group,
    real_range,
    realign_teacher,
    resolve_real_vocab,
    tp_rank_and_size,
)


def _chunk_logits(hidden_chunk, student_weight_real, teacher_hidden_chunk, teacher_weight_pieces):
    """Logits of one token chunk: student ``[c, n]`` and realigned teacher pieces, in the model dtype."""
    student = torch.matmul(hidden_chunk, student_weight_real.t())
    teacher = [(start, stop, torch.matmul(teacher_hidden_chunk, weight.t()))
               for start, stop, weight in teacher_weight_pieces]
    return student, teacher


class _FusedChunkedDivergence(torch.autograd.Function):
    """Output-layer matmul + divergence (or vOPD) per token chunk; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, sampled_tokens, kind,
                real_vocab_size, tp_group, options):
        temperature, beta, sink = float(options.temperature), float(options.beta), options.diagnostics
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # [N, h_s], replicated on tp_group
        teacher_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # [N, h_t]
        num_rows = hidden.shape[0]
        rank, _ = tp_rank_and_size(tp_group)
        first, last = real_range(student_weight.shape[0], rank, real_vocab_size)
        num_cols = last - first
        weight_real = student_weight[:num_cols]
        # Realign teacher weight rows once (not logits per chunk): the data moved is independent of N.
        w_pieces = realign_teacher(teacher_weight, 0, student_weight.shape[0], real_vocab_size, tp_group)
        device = student_hidden.device
        sampled = kind == "vopd"
        # vOPD: the reverse-KL statistics, the sampled logits and its support (sampled_token.sampled_columns).
        support_k = support_size(options) if sampled else (0 if sink is None else sink.top_k)
        stats_width = {"vopd": 7, "mixed": 10, "jsd": 0}.get(kind, 5)
        width = stats_width + (num_columns(support_k) if support_k and kind != "jsd" else 0)
        if sampled:
            ids, owned = sampled_ids(sampled_tokens, student_weight.shape[0], num_cols, tp_group)
        token_stats = torch.empty((len(TokenStats._fields), num_rows), dtype=torch.float32, device=device)
        # Local per-token columns for the one gather of KL, mixed and vOPD; diagnostics columns ride on it
        # (JSD's per-chunk gathers carry them instead).
        local = torch.empty((num_rows, width), dtype=torch.float32, device=device)
        gathered_diag = []
        pass_kind = "reverse_kl" if sampled else kind
        for rows, _ in token_chunks(num_rows, options.chunk_size):
            logits, t_logits = _chunk_logits(hidden[rows], weight_real, teacher_h[rows], w_pieces)
            shard = ShardPass.over_logits(logits, num_cols, t_logits, pass_kind, temperature, beta)
            if sampled:
                local[rows] = sampled_columns(shard, ids[rows], owned[rows], support_k)
            elif kind == "jsd":
                # Two collectives per chunk: recomputing the matmuls for a second pass would cost more.
                diag = None if sink is None else local_columns(shard, sink.top_k)
                chunk_stats, columns = shard.forward_with(tp_group, diag)
                token_stats[:, rows] = torch.stack(chunk_stats)
                if sink is not None:
                    gathered_diag.append(columns)
            else:
                local[rows, :stats_width] = shard.local_stats()
                if sink is not None:
                    local[rows, stats_width:] = local_columns(shard, sink.top_k)
            del logits, t_logits, shard
        stats, extra = TokenStats(*token_stats), ()
        if sampled:
            merged = SampledStats.empty(device) if num_rows == 0 else SampledStats.merge(
                _Math.gather_token_stats(local, tp_group), temperature, support_k)
            stats = merged.stats
            extra = (merged.advantage(options), ids, owned)
        elif kind != "jsd" and num_rows > 0:
            gathered = _Math.gather_token_stats(local, tp_group)
            stats = TokenStats.from_local(gathered[..., :stats_width], kind, temperature, beta)
            if sink is not None:
                gathered_diag.append(gathered[..., stats_width:])
        if sink is not None and num_rows > 0 and not sampled:
            sink.add(merge_columns(torch.cat(gathered_diag, dim=1), temperature, sink.top_k), stats.loss, None)
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, *(p[2] for p in w_pieces),
                              *stats[1:], *extra)
        ctx.piece_bounds = [p[:2] for p in w_pieces]
        ctx.kind, ctx.beta, ctx.temperature, ctx.num_cols = kind, beta, temperature, num_cols
        ctx.chunk_size, ctx.tp_group = options.chunk_size, tp_group
        return stats.loss.view(student_hidden.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        sampled = ctx.kind == "vopd"
        saved = list(ctx.saved_tensors)
        advantage, ids, owned = saved[-3:] if sampled else (None, None, None)
        saved = saved[:-3] if sampled else saved
        student_hidden, student_weight, teacher_hidden, *w_tensors, max_s, log_z_s, max_t, log_z_t, aux = saved
        w_pieces = [(start, stop, w) for (start, stop), w in zip(ctx.piece_bounds, w_tensors)]
        num_cols = ctx.num_cols
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        weight_real = student_weight[:num_cols]
        num_rows = hidden.shape[0]
        # g / T, for vOPD g A / T (as the unfused estimator computes it)
        scale = grad_loss.reshape(-1).float() * advantage / ctx.temperature if sampled else (
            grad_loss.reshape(-1).float() / ctx.temperature)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None
        # fp32 accumulation across chunks; weight-sized, so independent of the sequence length.
        grad_weight = (torch.zeros(student_weight.shape, dtype=torch.float32, device=student_weight.device)
                       if need_weight else None)
        if num_cols > 0 and (need_hidden or need_weight):
            for rows, _ in token_chunks(num_rows, ctx.chunk_size):
                if sampled:  # the policy gradient reads the student's logits only
                    logits = torch.matmul(hidden[rows], weight_real.t())
                    t_logits = []
                else:
                    logits, t_logits = _chunk_logits(hidden[rows], weight_real, teacher_h[rows], w_pieces)
                grad_logits = torch.empty_like(logits)  # [c, n] model dtype, as an output layer would see it
                shard = ShardPass.over_logits(logits, num_cols, t_logits, "reverse_kl" if sampled else ctx.kind,
                                              ctx.temperature, ctx.beta)
                if sampled:
                    write_policy_gradient(shard, (max_s[rows], log_z_s[rows]), scale[rows], ids[rows], owned[rows],
                                          grad_logits)
                else:
                    shard.write_grad((max_s[rows], log_z_s[rows]), (max_t[rows], log_z_t[rows]), aux[rows],
                                     scale[rows], grad_logits)
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
                None, None, None, None, None, None, None)


def fused_chunked_divergence(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                             options: DivergenceOptions = DivergenceOptions(fused=True),
                             sampled_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output layer + ``vocab_parallel_divergence`` (or vOPD) without materialising more than one chunk of logits.

    Args:
        student_hidden: ``[s, b, h_s]`` final hidden states (after the final norm), replicated on tp_group;
            its gradient is the full one (already summed over tp_group).
        student_weight: ``[Vs/tp, h_s]`` vocab-parallel output weight shard on tp_group.
        teacher_hidden: ``[s, b, h_t]``, replicated on tp_group; no gradient.
        teacher_weight: ``[Vt/tp, h_t]`` on tp_group; no gradient.
        options: ``chunk_size`` (tokens per chunk; the last may be shorter) and the rest as in
            ``vocab_parallel_divergence`` (``options.tp_group`` is tp_group); ``divergence=vopd``: the
            sampled-token estimator with ``baseline``, ``top_k``, ``reward_clip`` as in
            ``sampled_token_policy_gradient``.
        sampled_tokens: ``[s, b]`` global ids of the response tokens, replicated on tp_group (vOPD only).
    Returns:
        ``[s, b]`` fp32 per-token loss, identical on every rank of tp_group; equal (up to matmul rounding)
        to ``vocab_parallel_divergence(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)``
        (vOPD: to ``sampled_token_policy_gradient`` of those logits, value and gradient).
    """
    if options.divergence == "vopd":
        check_sampled_options(options)
        if sampled_tokens is None or sampled_tokens.shape != student_hidden.shape[:-1]:
            raise ValueError(f"vopd needs the sampled tokens, one per hidden state {tuple(student_hidden.shape[:-1])}")
        kind = "vopd"
    else:
        kind = resolve_divergence(options.divergence, options.beta, options.temperature)
    if options.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {options.chunk_size}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"token shapes differ: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    tp_group = effective_tp_group(options.tp_group)
    real_vocab = resolve_real_vocab(student_weight.shape[0], teacher_weight.shape[0], options.real_vocab_size,
                                    tp_group)
    return _FusedChunkedDivergence.apply(student_hidden, student_weight, teacher_hidden.detach(),
                                         teacher_weight.detach(), sampled_tokens, kind, real_vocab, tp_group, options)
