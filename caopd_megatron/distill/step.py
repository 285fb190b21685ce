"""One distillation optimizer step: teacher and student score the same response tokens; minimise the divergence.

Design decisions:
- Teacher (privileged prompt + response) and student (plain prompt + response) run on their own packed
  batches; logits are gathered at response positions so both are ``[b, R, V/tp]`` and token-aligned.
  The teacher runs under ``no_grad``; only the student's response positions enter the loss.
- The loss is ``vocab_parallel_divergence`` on the vocabulary shards of the tensor-parallel group (no
  gather of the vocabulary), reduced by ``masked_sequence_mean``: mean over a sequence's tokens, then over
  sequences. Micro-batches weight their mean by their share of sequences, so gradient accumulation gives
  exactly the full-batch gradient.
- The fused path (``distill.fused``) feeds final hidden states and the output-layer weight shards to the
  chunked loss, so the full ``[b, s, V/tp]`` logits of neither model are ever materialised.
- Under pipeline (PP > 1) or data (DP > 1) parallelism ``distill_step`` hands over to
  ``parallel.steps.distill_step_parallel`` (megatron's schedules, DDP-wrapped student; see
  ``parallel/design.md``); the body below is the single-process / tensor-parallel path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from caopd_megatron.config.schema import DistillConfig
from caopd_megatron.data.records import DistillExample
from caopd_megatron.distill.batching import PackedBatch, gather_positions, pack
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
from caopd_megatron.distill.losses import masked_sequence_mean, vocab_parallel_divergence
from caopd_megatron.distill.optim import optimizer_step
from caopd_megatron.distill.sft import SupervisedRows, tp_group_or_none


def model_logits(model, batch: PackedBatch) -> torch.Tensor:
    """``[b, L, V/tp]`` logits of this rank's vocabulary shard."""
    return model(batch.tokens, batch.positions, attention_mask=None)


class _HiddenCapture:
    """Context manager that makes a GPTModel's output layer hand back its input (the final hidden states).

    megatron-core's GPTModel has no switch to return hidden states, and the fused loss needs them with the
    output weight instead of logits; swapping the output layer's forward for one call is the least invasive way.
    """

    def __init__(self, model) -> None:
        self.layer = model.output_layer
        self.model = model

    def __enter__(self):
        layer = self.layer

        def passthrough(input_, weight=None, runtime_gather_output=None, **_):
            if getattr(layer, "sequence_parallel", False):
                # [s/tp, b, h] -> [s, b, h]. Backward is a plain slice, not a reduce-scatter: the fused loss
                # already all-reduces its hidden gradient over TP (distill/losses.py, note 7).
                from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

                input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
            return input_, None

        self._orig = layer.forward
        layer.forward = passthrough
        return self

    def __exit__(self, *exc) -> None:
        self.layer.forward = self._orig


def output_weight(model) -> torch.Tensor:
    """The vocab-parallel output weight ``[V/tp, h]`` (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def model_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """Final hidden states (after the final norm), ``[b, L, h]``, replicated on the TP group."""
    with _HiddenCapture(model):
        out = model(batch.tokens, batch.positions, attention_mask=None)
    return out


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    tokens: int
    sequences: int
    lr: float


def micro_batches(n: int, size: int) -> list[slice]:
    size = max(1, size)
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def distill_loss(student, teacher, s_batch: PackedBatch, t_batch: PackedBatch, cfg: DistillConfig,
                 real_vocab_size: int) -> torch.Tensor:
    """Scalar loss of one micro-batch (mean over tokens, then sequences); gradients flow to the student only."""
    group = tp_group_or_none()
    kw = dict(divergence=cfg.loss, beta=cfg.beta, temperature=cfg.temperature, real_vocab_size=real_vocab_size,
              tp_group=group)
    if cfg.fused:
        with torch.no_grad():
            t_hidden = gather_positions(model_hidden(teacher, t_batch), t_batch.index)
        s_hidden = gather_positions(model_hidden(student, s_batch), s_batch.index)
        per_token = fused_chunked_divergence(
            s_hidden.transpose(0, 1), output_weight(student), t_hidden.transpose(0, 1).detach(),
            output_weight(teacher).detach(), chunk_size=cfg.chunk_size, **kw).transpose(0, 1)
    else:
        with torch.no_grad():
            t_logits = gather_positions(model_logits(teacher, t_batch), t_batch.index)
        s_logits = gather_positions(model_logits(student, s_batch), s_batch.index)
        per_token = vocab_parallel_divergence(s_logits, t_logits, **kw)
    return masked_sequence_mean(per_token, s_batch.mask)


def distill_step(student, teacher, optimizer, scheduler, examples: Sequence[DistillExample], cfg: DistillConfig,
                 pad_id: int, real_vocab_size: int,
                 extra_loss: Callable[[], torch.Tensor] | SupervisedRows | None = None) -> StepStats:
    """Forward/backward over micro-batches of ``examples``, clip, and take one optimizer step.

    ``extra_loss``: called once after the distillation micro-batches; its scalar is added to the step's loss
    (its gradient joins the same optimizer step). The trainer uses it for teacher-format replay, as
    ``SupervisedRows`` (rows as data, which the pipeline-parallel path can schedule) or a closure.
    """
    from caopd_megatron.parallel.data_parallel import needs_parallel_path

    if needs_parallel_path(student):
        from caopd_megatron.parallel.steps import distill_step_parallel

        return distill_step_parallel(student, teacher, optimizer, scheduler, examples, cfg, pad_id, real_vocab_size,
                                     extra_loss)
    device = next(student.parameters()).device
    s_all = pack([e.student_prompt_ids for e in examples], [e.response_ids for e in examples], pad_id,
                 cfg.skip_first_tokens)
    n_valid = int((s_all.mask.sum(1) > 0).sum())
    optimizer.zero_grad(set_to_none=True)
    student.train()
    total = 0.0
    for sl in micro_batches(len(examples), cfg.micro_batch_size):
        part = examples[sl]
        s_batch = pack([e.student_prompt_ids for e in part], [e.response_ids for e in part], pad_id,
                       cfg.skip_first_tokens).to(device)
        t_batch = pack([e.teacher_prompt_ids for e in part], [e.response_ids for e in part], pad_id,
                       cfg.skip_first_tokens).to(device)
        share = int((s_batch.mask.sum(1) > 0).sum())
        if share == 0:
            continue
        loss = distill_loss(student, teacher, s_batch, t_batch, cfg, real_vocab_size) * (share / max(1, n_valid))
        loss.backward()
        total += float(loss.detach())
    if isinstance(extra_loss, SupervisedRows):
        extra_loss.loss(student, real_vocab_size).backward()
    elif extra_loss is not None:
        extra_loss().backward()
    norm, lr = optimizer_step(student, optimizer, scheduler, cfg.grad_clip)
    return StepStats(loss=total, grad_norm=norm, tokens=int(s_all.mask.sum()), sequences=n_valid, lr=lr)
