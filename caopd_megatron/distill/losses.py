"""The distillation loss over vocab-parallel logits: per-token divergences and their per-sequence mean.

Design decisions:
- ``vocab_parallel_divergence`` is the unfused loss: the caller has the student's and the teacher's logits
  (``[..., V/tp]`` on the TP group). One ``torch.autograd.Function`` serves every divergence (reverse and
  forward KL, JSD, their ``mixed``), with the analytic backward of ``divergence_math`` (no autograd graph
  through the softmax, no second backward). The output-layer-fused variant is
  ``fused_output_loss.fused_chunked_divergence``; the sampled-token estimator (vOPD) is ``sampled_token``.
- Forward saves only the inputs, the received teacher slices and five per-token scalars; backward
  recomputes ``log p``/``log q`` chunk by chunk (``divergence_passes``) and issues no collective.
- fp32 arithmetic whatever the input dtype; the loss is fp32 and the gradient comes back in the student's
  dtype. Padding (ids ``>= real_vocab_size``) gets no mass and an exactly zero gradient (``vocab_realign``).
- ``masked_sequence_mean`` selects (never multiplies) the unmasked tokens, so NaN/inf under the mask
  cannot leak into the value or the gradient.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from caopd_megatron.distill.divergence_math import resolve_divergence
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.divergence_passes import ShardPass, TokenStats
from caopd_megatron.distill.token_diagnostics import local_columns, merge_columns
from caopd_megatron.distill.vocab_realign import effective_tp_group, layout_logits, resolve_real_vocab


class _VocabParallelDivergenceFunction(torch.autograd.Function):
    """Per-token divergence of vocab-parallel logits; backward is the analytic ``dL/dz_s`` (no collective)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, kind, temperature, beta, real_vocab_size, tp_group, sink):
        layout = layout_logits(student_logits, teacher_logits, real_vocab_size, tp_group)
        shard = ShardPass.over_logits(layout.student_2d, layout.num_cols, layout.teacher_pieces, kind, temperature,
                                      beta)
        if shard.num_rows == 0:
            stats = TokenStats.empty(student_logits.device)
        elif sink is None:
            stats = shard.forward(tp_group)
        else:
            # The diagnostics ride on the divergence's first collective.
            stats, columns = shard.forward_with(tp_group, local_columns(shard, sink.top_k))
            sink.add(merge_columns(columns, temperature, sink.top_k), stats.loss, None)
        # Only inputs, received teacher slices and five per-token scalars: backward recomputes the rest.
        ctx.save_for_backward(student_logits, *(piece[2] for piece in layout.teacher_pieces), *stats[1:])
        ctx.piece_bounds = [piece[:2] for piece in layout.teacher_pieces]
        ctx.num_cols, ctx.kind, ctx.temperature, ctx.beta = layout.num_cols, kind, temperature, beta
        return stats.loss.view(student_logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        student_logits, *teacher_tensors, max_s, log_z_s, max_t, log_z_t, aux = ctx.saved_tensors
        num_cols = ctx.num_cols
        student_2d = student_logits.reshape(-1, student_logits.shape[-1])
        grad_2d = torch.empty_like(student_2d, memory_format=torch.contiguous_format)
        grad_2d[:, num_cols:].zero_()
        teacher_pieces = [(start, stop, tensor) for (start, stop), tensor in zip(ctx.piece_bounds, teacher_tensors)]
        shard = ShardPass.over_logits(student_2d, num_cols, teacher_pieces, ctx.kind, ctx.temperature, ctx.beta)
        shard.write_grad((max_s, log_z_s), (max_t, log_z_t), aux, grad_loss.reshape(-1).float() / ctx.temperature,
                         grad_2d[:, :num_cols])
        return grad_2d.view(student_logits.shape), None, None, None, None, None, None, None


def vocab_parallel_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              options: DivergenceOptions = DivergenceOptions()) -> torch.Tensor:
    """Per-token divergence between vocab-parallel student and teacher logits.

    Args:
        student_logits: ``[..., Vs/tp]`` rows ``[r*Vs/tp, (r+1)*Vs/tp)`` of the student's padded vocab on
            rank r of ``options.tp_group``; any float dtype; receives the gradient (same dtype and shape).
        teacher_logits: ``[..., Vt/tp]`` likewise for the teacher (``Vt`` may differ from ``Vs``); detached.
        options: ``divergence`` ``"reverse_kl"`` KL(p||q), ``"forward_kl"`` KL(q||p), ``"jsd"`` generalised
            JSD(beta) (beta 0 / 1 give forward / reverse KL, as in TRL's GKD), ``"mixed"`` ``beta KL(q||p) +
            (1 - beta) KL(p||q)`` (beta is then the forward-KL weight); ``temperature``; ``real_vocab_size``
            (ids at or above it are padding: no mass, zero gradient; ``None`` requires ``Vs == Vt``);
            ``tp_group``; ``diagnostics`` (computed on the same collective). See ``DivergenceOptions``.
    Returns:
        ``[...]`` fp32 per-token loss, replicated (bitwise identical) on every rank of tp_group.
    """
    kind = resolve_divergence(options.divergence, options.beta, options.temperature)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"token shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError("logits must be floating point")
    tp_group = effective_tp_group(options.tp_group)
    real_vocab = resolve_real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], options.real_vocab_size,
                                    tp_group)
    return _VocabParallelDivergenceFunction.apply(student_logits, teacher_logits.detach(), kind,
                                                  float(options.temperature), float(options.beta), real_vocab,
                                                  tp_group, options.diagnostics)


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
