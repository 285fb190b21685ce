"""Micro-batch forward/backward on megatron-core's schedules, for every layout, and the teacher's forward pass.

Design decisions (long form: ``docs/design.md``):
- One path: ``get_forward_backward_func`` over the model's process groups: the no-pipelining loop at PP = 1
  (one process, TP, DP, SP), 1F1B at PP > 1. We supply only the forward-step function.
- ``post_fn`` returns a micro-batch's contribution to the *step* loss, already weighted by global counts.
  Models are built with ``calculate_per_token_loss`` and the loss function returns megatron's
  ``(loss, tokens, report)`` triple, so the schedule backpropagates the loss exactly as given (no division
  by the micro-batch count) and DDP does not pre-scale by 1/DP: one process's arithmetic is every layout's.
- Under PP one activation shape per call: micro-batches are right-padded to one ``[rows, L]``; under SP the
  length is a multiple of TP (``pad_for_schedule``). The loss slices real rows and gathers real positions.
- The teacher runs first, forward-only, keeping per micro-batch its final hidden states at response
  positions ``[b, R, h_t]`` (``teacher_response_hidden``); the student's loss projects them.
- No gradient finalisation inside a call: a step may make several calls (distillation, replay).
- megatron-core is imported inside functions, as everywhere in the package: ``runtime.backend`` imports it
  first and explains a broken Transformer Engine.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from caopd_megatron.distill.batching import PackedBatch, gather_positions
from caopd_megatron.parallel.data_parallel import (
    gradient_sync,
    is_last_stage,
    model_groups,
    pipeline_parallel_size,
    sequence_multiple,
    unwrap,
)


class HiddenStateCapture:
    """Context manager that makes a GPTModel's output layer hand back its input (the final hidden states,
    ``[s, b, h]``, replicated on the TP group) instead of logits.

    megatron-core's GPTModel has no switch to return hidden states, and the fused loss and the teacher pass
    need them; swapping the output layer's forward for one call is the least invasive way.
    """

    def __init__(self, model) -> None:
        self.layer = unwrap(model).output_layer
        self.tp_group = model_groups(model).tp

    def __enter__(self):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        layer, tp_group = self.layer, self.tp_group

        def passthrough(input_, weight=None, runtime_gather_output=None, **_):
            if getattr(layer, "sequence_parallel", False):
                # [s/tp, b, h] -> [s, b, h]. Backward is a plain slice, not a reduce-scatter: the fused loss
                # already all-reduces its hidden gradient over TP (distill/losses.py, note 7).
                input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                              group=tp_group)
            return input_, None

        self._orig = layer.forward
        layer.forward = passthrough
        return self

    def __exit__(self, *exc) -> None:
        self.layer.forward = self._orig


def output_weight(model) -> torch.Tensor:
    """The vocab-parallel output weight ``[V/tp, h]`` (the embedding when tied) of ``model`` (any wrapper)."""
    inner = unwrap(model)
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def pad_for_schedule(batches: Sequence[PackedBatch], pad_id: int, pipelined: bool,
                     seq_multiple: int = 1) -> list[PackedBatch]:
    """``tokens``/``positions`` padded for the schedule: with ``pipelined`` every batch to one ``[rows, L]``
    shape; the length (each batch's, or the common one) rounded up to ``seq_multiple`` (TP under sequence
    parallelism). Unchanged when neither applies.

    ``index``/``mask``/``targets`` keep their real rows (``index.size(0)`` is the real row count).
    """
    if not batches or (not pipelined and seq_multiple == 1):
        return list(batches)

    def round_up(n: int) -> int:
        return -(-n // seq_multiple) * seq_multiple

    common_rows = max(b.tokens.size(0) for b in batches)
    common_length = round_up(max(b.tokens.size(1) for b in batches))
    out = []
    for b in batches:
        rows = common_rows if pipelined else b.tokens.size(0)
        length = common_length if pipelined else round_up(b.tokens.size(1))
        tokens = torch.full((rows, length), pad_id, dtype=b.tokens.dtype, device=b.tokens.device)
        tokens[: b.tokens.size(0), : b.tokens.size(1)] = b.tokens
        positions = torch.arange(length, device=b.tokens.device).unsqueeze(0).expand(rows, -1).contiguous()
        out.append(replace(b, tokens=tokens, positions=positions))
    return out


def schedule_batches(model, batches: Sequence[PackedBatch], pad_id: int) -> list[PackedBatch]:
    """``batches`` padded as ``model``'s layout needs (``pad_for_schedule``) and moved to its device."""
    pipelined = pipeline_parallel_size(model_groups(model)) > 1
    device = next(model.parameters()).device
    return [b.to(device) for b in pad_for_schedule(batches, pad_id, pipelined, sequence_multiple(model))]


def real_rows(output: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``[rows_padded, L_padded, *]`` last-stage output -> its real rows ``[b, L_padded, *]``."""
    return output[: batch.index.size(0)]


def forward_backward(model, batches: Sequence[PackedBatch], post_fn: Callable[[torch.Tensor, int], Any], *,
                     forward_only: bool = False, collect: bool = False, hidden: bool = False,
                     last_call: bool = True) -> list:
    """Run ``batches`` (equal shapes under PP) through ``model`` on megatron's schedule, over its groups.

    Args:
        model: this rank's stage (plain or DDP-wrapped GPTModel).
        post_fn: on the last stage, ``post_fn(output, i)`` with ``output`` the model's output for micro-batch
            ``i`` (``[b, L, V/tp]`` logits on the TP group, or ``[b, L, h]`` final hidden states with
            ``hidden=True``). With ``collect`` its return values are collected; otherwise it returns the scalar
            loss contribution whose backward runs.
        last_call: the optimizer step's last backward call; with overlapped DP reduction only that call may
            launch the reductions (``data_parallel.gradient_sync``). Every DP rank must make the call, even
            with no batches of its own.
    Returns:
        On the last stage, one entry per micro-batch (``post_fn``'s value with ``collect``, else the detached
        loss contribution); an empty list on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    n = len(batches)
    groups = model_groups(model)
    config = unwrap(model).config

    def step(data_iterator, stage):
        i, batch = next(data_iterator)
        capture = HiddenStateCapture(stage) if hidden and unwrap(stage).post_process else contextlib.nullcontext()
        with capture:
            out = stage(batch.tokens, batch.positions, attention_mask=None)

        def loss_func(output, non_loss_data=False):
            if non_loss_data:
                return post_fn(output, i)
            loss = post_fn(output, i)
            # (loss, tokens, report): with calculate_per_token_loss megatron backpropagates ``loss`` as is.
            return loss, batch.mask.sum().int(), {"loss": loss.detach()}

        return out, loss_func

    with contextlib.nullcontext() if forward_only else gradient_sync(model, last_call, n):
        if n == 0:
            return []
        pipelined = pipeline_parallel_size(groups) > 1
        p2p = P2PCommunicator(pp_group=groups.pp, config=config) if pipelined else None
        store = get_forward_backward_func(pp_size=groups.pp.size(), vp_size=None)(
            forward_step_func=step, data_iterator=iter(enumerate(batches)), model=model, num_microbatches=n,
            seq_length=batches[0].tokens.size(1), micro_batch_size=batches[0].tokens.size(0),
            forward_only=forward_only, collect_non_loss_data=collect, pg_collection=groups,
            **({"p2p_communicator": p2p} if pipelined else {}))
    if not is_last_stage(groups):
        return []
    return list(store) if collect else [d["loss"] for d in store]


@torch.no_grad()
def teacher_response_hidden(teacher, t_batches: Sequence[PackedBatch]) -> list[torch.Tensor | None]:
    """Forward-only teacher pass; per micro-batch ``[b, R, h_t]`` final hidden states at response positions.

    Lives on the teacher's last pipeline stage, replicated on its TP group; ``None`` entries on other stages.
    """
    def keep(output: torch.Tensor, i: int) -> torch.Tensor:
        return gather_positions(real_rows(output, t_batches[i]), t_batches[i].index).detach()

    teacher.eval()
    out = forward_backward(teacher, t_batches, keep, forward_only=True, collect=True, hidden=True)
    return out if out else [None] * len(t_batches)
