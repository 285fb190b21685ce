"""The distillation and supervised steps under pipeline and/or data parallelism.

Design decisions:
- Every rank holds the step's full example list (rollouts all-gathered over DP, revision replicated); DP rank r trains on
  its contiguous slice (``dp_slice``) and every weight is computed from the *global* counts, which each rank
  knows without communication: a distillation micro-batch weighs ``valid sequences in it / valid sequences in
  the step`` (the single-process rule: mean over a sequence's tokens, then over sequences), a supervised one
  ``response tokens in it / response tokens in the step``. Summed over micro-batches and DP ranks this is
  exactly the single-process loss, whatever the split; DDP's 1/DP pre-scaling is cancelled by
  ``loss_scale_for_dp``.
- Order of a distillation step: teacher forward-only pass (hidden states at response positions kept on the
  last stage) -> student 1F1B forward/backward whose last-stage loss uses the same micro-batch's teacher
  states -> optional replay cross-entropy pass -> one gradient finalisation (DP all-reduce or, for the
  distributed optimizer, reduce-scatter; tied embeddings) -> clipping, optimizer and LR-schedule step in
  ``distill.optim.optimizer_step`` (model-parallel clipping of full gradients, or megatron's distributed
  optimizer clipping its ranges and all-gathering the updated parameters).
- Reported numbers are identical on every rank: the loss is summed over DP and broadcast from the last stage.
- A DP rank with no examples (fewer examples than replicas) runs no micro-batch but still joins the
  gradient all-reduce with zeros, so collectives never mismatch.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caopd_megatron.config.schema import DistillConfig
from caopd_megatron.distill.batching import gather_positions, pack
from caopd_megatron.parallel import data_parallel as dp
from caopd_megatron.parallel.schedule import (
    forward_backward,
    pad_for_schedule,
    real_rows,
    teacher_response_hidden,
)


def _micro_slices(start: int, stop: int, size: int) -> list[slice]:
    size = max(1, size)
    return [slice(s, min(stop, s + size)) for s in range(start, stop, size)]


def _step_total(values: Sequence[torch.Tensor]) -> float:
    """Sum of this rank's last-stage loss contributions, summed over DP, seen by every rank."""
    total = torch.zeros((), dtype=torch.float32)
    for v in values:
        total += v.detach().float().cpu()
    dp.all_reduce_dp(total)
    dp.broadcast_from_last_stage(total)
    return float(total)


def distill_backward(student, teacher, examples, cfg: DistillConfig, pad_id: int, real_vocab_size: int,
                     n_valid: int, last_call: bool = True) -> float:
    """Forward/backward of the distillation loss over this DP rank's slice; returns the global step loss.

    Gradients are left in DDP's buffers (not finalised); ``last_call``: no backward follows in this step.
    """
    from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
    from caopd_megatron.distill.losses import masked_sequence_mean, vocab_parallel_divergence
    from caopd_megatron.distill.sft import tp_group_or_none
    from caopd_megatron.distill.step import output_weight

    local = dp.dp_slice(len(examples))
    s_batches, t_batches, shares = [], [], []
    for sl in _micro_slices(local.start, local.stop, cfg.micro_batch_size):
        part = examples[sl]
        s = pack([e.student_prompt_ids for e in part], [e.response_ids for e in part], pad_id, cfg.skip_first_tokens)
        share = int((s.mask.sum(1) > 0).sum())
        if share == 0:  # same rule as the single-process step: a micro-batch without loss tokens is skipped
            continue
        s_batches.append(s)
        t_batches.append(pack([e.teacher_prompt_ids for e in part], [e.response_ids for e in part], pad_id,
                              cfg.skip_first_tokens))
        shares.append(share)
    device = next(student.parameters()).device
    s_batches = [b.to(device) for b in pad_for_schedule(s_batches, pad_id, dp.sequence_multiple(student))]
    t_batches = [b.to(device) for b in pad_for_schedule(t_batches, pad_id, dp.sequence_multiple(teacher))]

    t_hidden = teacher_response_hidden(teacher, t_batches)
    inner_student, inner_teacher = dp.unwrap(student), dp.unwrap(teacher)
    group = tp_group_or_none()
    kw = dict(divergence=cfg.loss, beta=cfg.beta, temperature=cfg.temperature, real_vocab_size=real_vocab_size,
              tp_group=group)
    scale = dp.loss_scale_for_dp()

    def loss_fn(output: torch.Tensor, i: int) -> torch.Tensor:
        s_batch = s_batches[i]
        s_out = gather_positions(real_rows(output, s_batch), s_batch.index)  # [b, R, h_s] or [b, R, V/tp]
        t_h = t_hidden[i]  # [b, R, h_t]
        t_hidden[i] = None  # the loss keeps what backward needs; drop the step's reference early
        t_w = output_weight(inner_teacher).detach()  # [Vt/tp, h_t]
        if cfg.fused:
            per_token = fused_chunked_divergence(s_out.transpose(0, 1), output_weight(inner_student),
                                                 t_h.transpose(0, 1), t_w, chunk_size=cfg.chunk_size,
                                                 **kw).transpose(0, 1)
        else:
            t_logits = torch.matmul(t_h, t_w.t())  # [b, R, Vt/tp]: this micro-batch's response positions only
            per_token = vocab_parallel_divergence(s_out, t_logits, **kw)
        weighted = masked_sequence_mean(per_token, s_batch.mask) * (shares[i] / max(1, n_valid))
        return weighted * scale

    student.train()
    losses = forward_backward(student, s_batches, loss_fn, hidden=cfg.fused, last_call=last_call)
    return _step_total([v / scale for v in losses])


def sft_backward(model, rows, real_vocab_size: int, micro_batch_size: int, last_call: bool = True) -> float:
    """Forward/backward of ``rows`` (a ``distill.sft.SupervisedRows``): the mean cross entropy over all response
    tokens of all rows, this DP rank's slice in micro-batches. Returns the global loss; gradients not finalised.
    """
    from caopd_megatron.distill.sft import one_hot_shard, sft_loss_from_logits, vocab_shard_range

    total_tokens = sum(len(r) for r in rows.responses)
    local = dp.dp_slice(len(rows))
    shard = vocab_shard_range(model)
    batches, rows_of = [], []
    for sl in _micro_slices(local.start, local.stop, micro_batch_size):
        b = pack(rows.prompts[sl], rows.responses[sl], rows.pad_id)
        if int(b.mask.sum()) == 0:
            continue
        batches.append(b)
        rows_of.append(range(sl.start, sl.stop))
    device = next(model.parameters()).device
    batches = [b.to(device) for b in pad_for_schedule(batches, rows.pad_id, dp.sequence_multiple(model))]
    scale = dp.loss_scale_for_dp()

    def loss_fn(output: torch.Tensor, i: int) -> torch.Tensor:
        b = batches[i]
        if rows.targets_fn is not None:
            targets = rows.targets_fn(rows_of[i], b, shard)
        else:
            targets = one_hot_shard(b.targets, shard)
        logits = gather_positions(real_rows(output, b), b.index)  # [b, R, V/tp]
        loss = sft_loss_from_logits(logits, b, real_vocab_size, shard, targets.to(logits.device), mean=False)
        return loss / max(1, total_tokens) * scale

    model.train()
    losses = forward_backward(model, batches, loss_fn, last_call=last_call)
    return _step_total([v / scale for v in losses])


def supervised_step(model, optimizer, scheduler, rows, real_vocab_size: int, micro_batch_size: int,
                    grad_clip: float) -> float:
    """One optimizer step of cross entropy on ``rows`` under PP/DP (the warm-up's step); returns the loss."""
    from caopd_megatron.distill.optim import optimizer_step

    dp.require_wrapped(model, "the supervised step")
    dp.start_gradients(model, optimizer)
    loss = sft_backward(model, rows, real_vocab_size, micro_batch_size)
    dp.finish_gradients(model)
    optimizer_step(model, optimizer, scheduler, grad_clip)
    return loss


def distill_step_parallel(student, teacher, optimizer, scheduler, examples, cfg: DistillConfig, pad_id: int,
                          real_vocab_size: int, extra_loss=None):
    """``distill.step.distill_step`` under PP > 1 and/or DP > 1 (same arguments, same ``StepStats``).

    ``extra_loss``: ``SupervisedRows`` (scheduled and DP-split like the distillation micro-batches), or, with
    PP = 1 only, a closure returning a scalar that every DP rank computes in full (DDP's average of identical
    gradients is that gradient).
    """
    from caopd_megatron.distill.optim import optimizer_step
    from caopd_megatron.distill.sft import SupervisedRows
    from caopd_megatron.distill.step import StepStats

    if extra_loss is not None and not isinstance(extra_loss, SupervisedRows) and dp.pipeline_parallel_size() > 1:
        raise TypeError("under pipeline parallelism an extra loss must be SupervisedRows (data the schedule can "
                        "micro-batch), not a closure that runs the whole model")

    dp.require_wrapped(student, "the distillation step")
    s_all = pack([e.student_prompt_ids for e in examples], [e.response_ids for e in examples], pad_id,
                 cfg.skip_first_tokens)
    n_valid = int((s_all.mask.sum(1) > 0).sum())
    replay = isinstance(extra_loss, SupervisedRows) and len(extra_loss) > 0
    closure = extra_loss is not None and not isinstance(extra_loss, SupervisedRows)
    dp.start_gradients(student, optimizer)
    total = 0.0
    if n_valid:
        total = distill_backward(student, teacher, examples, cfg, pad_id, real_vocab_size, n_valid,
                                 last_call=not (replay or closure))
    if replay:
        sft_backward(student, extra_loss, real_vocab_size, cfg.micro_batch_size)
    elif closure:
        # Every replica computes the same closure: DDP's 1/DP-scaled sum of identical gradients is that gradient.
        extra_loss().backward()
    dp.finish_gradients(student)
    norm, lr = optimizer_step(student, optimizer, scheduler, cfg.grad_clip)
    return StepStats(loss=total, grad_norm=norm, tokens=int(s_all.mask.sum()), sequences=n_valid, lr=lr)
