"""The one training step of every layout: distillation (plus optional replay) and the supervised warm-up.

Design decisions (long form: ``docs/design.md``):
- One body for one process, TP, PP, DP, SP and their products: packed micro-batches of this DP rank's slice
  go through megatron's schedule (``distill/schedule.py``); the teacher runs first, forward-only, keeping
  its final hidden states at response positions; ``response_divergence`` is the one loss entry point and
  picks the objective (``distill.loss``: a divergence of ``losses``/``fused_output_loss``, or vOPD of
  ``sampled_token`` on the response tokens); an optional ``StepDiagnostics`` rides along.
- Weights come from *global* counts every rank knows without communication: a distillation micro-batch
  weighs ``its valid sequences / the step's`` (mean over a sequence's tokens, then over sequences), a
  supervised one ``its response tokens / the step's``. Summed over micro-batches and DP ranks this is the
  full-batch loss whatever the split, so gradient accumulation gives the full-batch gradient.
- Order: teacher pass -> student forward/backward -> optional replay -> one gradient finalisation
  (``finish_gradients``) -> clipping, optimizer and LR-schedule step (``optimizer_step``).
- Reported numbers are identical on every rank (summed over DP, broadcast from the last stage).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from caopd_megatron.config.schema import DistillConfig
from caopd_megatron.data.records import DistillExample
from caopd_megatron.distill.batching import PackedBatch, gather_positions, pack
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
from caopd_megatron.distill.losses import masked_sequence_mean, vocab_parallel_divergence
from caopd_megatron.distill.optim import optimizer_step
from caopd_megatron.distill.sampled_token import sampled_token_policy_gradient
from caopd_megatron.distill.schedule import (
    HiddenStateCapture,
    forward_backward,
    output_weight,
    real_rows,
    schedule_batches,
    teacher_response_hidden,
)
from caopd_megatron.distill.sft import SupervisedRows, one_hot_shard, sft_loss_from_logits, vocab_shard_range
from caopd_megatron.distill.step_diagnostics import StepDiagnostics
from caopd_megatron.parallel.data_parallel import (
    all_reduce_dp,
    broadcast_from_last_stage,
    data_parallel_size,
    dp_slice,
    finish_gradients,
    model_groups,
    pipeline_parallel_size,
    require_wrapped,
    start_gradients,
)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    tokens: int
    sequences: int
    lr: float
    diagnostics: dict = field(default_factory=dict)  # step_diagnostics.diagnostic_keys() -> value (or empty)


def micro_batches(start: int, stop: int, size: int) -> list[slice]:
    """``[start, stop)`` cut into slices of ``size`` (at least 1) items."""
    size = max(1, size)
    return [slice(s, min(stop, s + size)) for s in range(start, stop, size)]


def response_divergence(student_out: torch.Tensor, teacher_hidden: torch.Tensor, student, teacher,
                        options: DivergenceOptions, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The distillation loss per response token, ``[b, R]`` fp32 (replicated on the TP group).

    ``student_out``: the student at response positions, ``[b, R, V/tp]`` logits, or with ``options.fused``
    ``[b, R, h_s]`` final hidden states; ``teacher_hidden``: the teacher's ``[b, R, h_t]`` final hidden states
    (no gradient). The teacher is projected through its output-layer shard ``[V_t/tp, h_t]``: all at once
    (unfused) or chunk by chunk together with the student (fused), so no full-sequence logits exist.
    ``targets``: the ``[b, R]`` response token ids (the sampled tokens ``divergence=vopd`` needs);
    ``options``: the step's ``DivergenceOptions`` (``divergence`` and ``fused`` pick the path).
    """
    t_weight = output_weight(teacher).detach()
    sampled = options.divergence == "vopd"
    if sampled and targets is None:
        raise ValueError("distill.loss=vopd needs the response tokens (targets)")
    if options.fused:
        tokens = targets.to(student_out.device).transpose(0, 1) if sampled else None
        return fused_chunked_divergence(student_out.transpose(0, 1), output_weight(student),
                                        teacher_hidden.transpose(0, 1), t_weight, options, tokens).transpose(0, 1)
    if sampled:
        return sampled_token_policy_gradient(student_out, torch.matmul(teacher_hidden, t_weight.t()),
                                             targets.to(student_out.device), options)
    return vocab_parallel_divergence(student_out, torch.matmul(teacher_hidden, t_weight.t()), options)


def step_options(student, cfg: DistillConfig, real_vocab_size: int,
                 diagnostics: Optional[StepDiagnostics] = None) -> DivergenceOptions:
    """The step's ``DivergenceOptions``: ``cfg`` on the student's TP group, with the diagnostics' sink."""
    return DivergenceOptions.from_config(cfg, real_vocab_size, model_groups(student).tp,
                                         None if diagnostics is None else diagnostics.sink)


def distill_loss(student, teacher, s_batch: PackedBatch, t_batch: PackedBatch, cfg: DistillConfig,
                 real_vocab_size: int) -> torch.Tensor:
    """One batch's loss through whole (PP = 1) models outside the schedule: mean over tokens, then sequences
    (a check of ``response_divergence`` for tests and tools; training runs ``distill_step``)."""
    with torch.no_grad(), HiddenStateCapture(teacher):
        t_hidden = gather_positions(teacher(t_batch.tokens, t_batch.positions, attention_mask=None), t_batch.index)
    with HiddenStateCapture(student) if cfg.fused else contextlib.nullcontext():
        s_out = gather_positions(student(s_batch.tokens, s_batch.positions, attention_mask=None), s_batch.index)
    options = step_options(student, cfg, real_vocab_size)
    return masked_sequence_mean(response_divergence(s_out, t_hidden, student, teacher, options, s_batch.targets),
                                s_batch.mask)


def step_total(values: Sequence[torch.Tensor], model) -> float:
    """Sum of this rank's last-stage loss contributions, summed over DP, seen by every rank."""
    total = sum(float(v) for v in values)
    groups = model_groups(model)
    if data_parallel_size(groups) == 1 and pipeline_parallel_size(groups) == 1:
        return total
    tensor = torch.tensor(total, dtype=torch.float64, device=next(model.parameters()).device)
    all_reduce_dp(tensor, groups)
    broadcast_from_last_stage(tensor, groups)
    return float(tensor)


def distill_backward(student, teacher, examples: Sequence[DistillExample], cfg: DistillConfig, pad_id: int,
                     real_vocab_size: int, n_valid: int, last_call: bool = True,
                     diagnostics: Optional[StepDiagnostics] = None) -> float:
    """Forward/backward of the distillation loss over this DP rank's slice; returns the global step loss.

    Gradients are left unfinalised (in DDP's buffers when wrapped); ``last_call``: no backward follows in
    this step; ``diagnostics`` accumulates this rank's per-token diagnostics.
    """
    groups = model_groups(student)
    local = dp_slice(len(examples), groups)
    s_batches, t_batches, shares = [], [], []
    for sl in micro_batches(local.start, local.stop, cfg.micro_batch_size):
        part = examples[sl]
        s = pack([e.student_prompt_ids for e in part], [e.response_ids for e in part], pad_id, cfg.skip_first_tokens)
        share = int((s.mask.sum(1) > 0).sum())
        if share == 0:  # a micro-batch without loss tokens is skipped
            continue
        s_batches.append(s)
        t_batches.append(pack([e.teacher_prompt_ids for e in part], [e.response_ids for e in part], pad_id,
                              cfg.skip_first_tokens))
        shares.append(share)
    s_batches = schedule_batches(student, s_batches, pad_id)
    t_hidden = teacher_response_hidden(teacher, schedule_batches(teacher, t_batches, pad_id))
    options = step_options(student, cfg, real_vocab_size, diagnostics)  # once: every micro-batch's loss reads it

    def loss_fn(output: torch.Tensor, i: int) -> torch.Tensor:
        s_batch = s_batches[i]
        s_out = gather_positions(real_rows(output, s_batch), s_batch.index)  # [b, R, h_s] or [b, R, V/tp]
        t_h, t_hidden[i] = t_hidden[i], None  # the loss keeps what backward needs; drop the step's reference
        per_token = response_divergence(s_out, t_h, student, teacher, options, s_batch.targets)
        if diagnostics is not None:
            diagnostics.absorb(s_batch.targets, s_batch.mask)
        return masked_sequence_mean(per_token, s_batch.mask) * (shares[i] / max(1, n_valid))

    student.train()
    losses = forward_backward(student, s_batches, loss_fn, hidden=cfg.fused, last_call=last_call)
    return step_total(losses, student)


def sft_backward(model, rows: SupervisedRows, real_vocab_size: int, micro_batch_size: int,
                 last_call: bool = True) -> float:
    """Forward/backward of ``rows``: the mean cross entropy over all response tokens of all rows, this DP
    rank's slice in micro-batches. Returns the global loss; gradients are left unfinalised."""
    groups = model_groups(model)
    total_tokens = sum(len(r) for r in rows.responses)
    local = dp_slice(len(rows), groups)
    shard = vocab_shard_range(model)
    batches, rows_of = [], []
    for sl in micro_batches(local.start, local.stop, micro_batch_size):
        b = pack(rows.prompts[sl], rows.responses[sl], rows.pad_id)
        if int(b.mask.sum()) == 0:
            continue
        batches.append(b)
        rows_of.append(range(sl.start, sl.stop))
    batches = schedule_batches(model, batches, rows.pad_id)

    def loss_fn(output: torch.Tensor, i: int) -> torch.Tensor:
        b = batches[i]
        if rows.targets_fn is not None:
            targets = rows.targets_fn(rows_of[i], b, shard)
        else:
            targets = one_hot_shard(b.targets, shard)
        logits = gather_positions(real_rows(output, b), b.index)  # [b, R, V/tp]
        loss = sft_loss_from_logits(logits, b, real_vocab_size, shard, groups.tp, targets.to(logits.device),
                                    mean=False)
        return loss / max(1, total_tokens)

    model.train()
    losses = forward_backward(model, batches, loss_fn, last_call=last_call)
    return step_total(losses, model)


def supervised_step(model, optimizer, scheduler, rows: SupervisedRows, real_vocab_size: int,
                    micro_batch_size: int, grad_clip: float) -> float:
    """One optimizer step of cross entropy on ``rows`` (the warm-up's step), any layout; returns the loss."""
    require_wrapped(model, "the supervised step")
    optimizer.zero_grad(set_to_none=True)
    start_gradients(model)
    loss = sft_backward(model, rows, real_vocab_size, micro_batch_size)
    finish_gradients(model)
    optimizer_step(model, optimizer, scheduler, grad_clip)
    return loss


def distill_step(student, teacher, optimizer, scheduler, examples: Sequence[DistillExample], cfg: DistillConfig,
                 pad_id: int, real_vocab_size: int,
                 extra_loss: Callable[[], torch.Tensor] | SupervisedRows | None = None,
                 diagnostics: Optional[StepDiagnostics] = None) -> StepStats:
    """Forward/backward over micro-batches of ``examples``, clip, and take one optimizer step (any layout).

    ``extra_loss``: its loss joins the same optimizer step (the trainer's teacher-format replay), as
    ``SupervisedRows`` (scheduled and DP-split like the distillation micro-batches) or, with PP = 1 only, a
    closure returning a scalar that every DP rank computes in full. ``diagnostics``: the step's answer /
    confidence token diagnostics are returned in ``StepStats.diagnostics``.
    """
    groups = model_groups(student)
    closure = extra_loss is not None and not isinstance(extra_loss, SupervisedRows)
    if closure and pipeline_parallel_size(groups) > 1:
        raise TypeError("under pipeline parallelism an extra loss must be SupervisedRows (data the schedule can "
                        "micro-batch), not a closure that runs the whole model")
    require_wrapped(student, "the distillation step")
    s_all = pack([e.student_prompt_ids for e in examples], [e.response_ids for e in examples], pad_id,
                 cfg.skip_first_tokens)
    n_valid = int((s_all.mask.sum(1) > 0).sum())
    replay = isinstance(extra_loss, SupervisedRows) and len(extra_loss) > 0
    optimizer.zero_grad(set_to_none=True)
    start_gradients(student)
    total = 0.0
    if n_valid:
        total = distill_backward(student, teacher, examples, cfg, pad_id, real_vocab_size, n_valid,
                                 last_call=not (replay or closure), diagnostics=diagnostics)
    if replay:
        sft_backward(student, extra_loss, real_vocab_size, cfg.micro_batch_size)
    elif closure:
        # Every replica computes the whole closure; DP replicas' gradients are summed, hence the 1/DP.
        (extra_loss() / data_parallel_size(groups)).backward()
    finish_gradients(student)
    norm, lr = optimizer_step(student, optimizer, scheduler, cfg.grad_clip, loss=total)
    report = diagnostics.summary(student) if diagnostics is not None else {}
    return StepStats(loss=total, grad_norm=norm, tokens=int(s_all.mask.sum()), sequences=n_valid, lr=lr,
                     diagnostics=report)
