"""Micro-batch forward/backward on megatron-core's pipeline schedules, and the teacher's forward-only pass.

Design decisions:
- The schedule is megatron-core's ``get_forward_backward_func()``: 1F1B without interleaving for PP > 1,
  the no-pipelining loop for PP = 1 (DP only). We supply only the forward-step function; megatron does the
  p2p of activations and gradients between stages.
- The schedules send one activation shape per call, ``[seq, micro_batch, hidden]``. Under PP every micro-batch
  of a call is therefore right-padded to the call's longest sequence and largest row count
  (``pad_for_schedule``): extra columns are pad tokens *after* every real token (causal attention: they never
  influence a real position) and extra rows are all-pad sequences. Under sequence parallelism the length is
  also rounded up to a multiple of TP (the sequence is split over the TP ranks). Only ``tokens``/``positions``
  are padded; the loss slices the last stage's output back to the real rows and gathers real positions by
  index, so padding adds no loss and no gradient.
- The teacher runs first, in its own forward-only schedule call (``teacher_response_hidden``), because its
  activations have another shape than the student's (privileged prompts are longer, and the teacher may be
  another size). The last stage keeps, per micro-batch, only the final hidden states at response positions,
  ``[b, R, h_t]`` in the model dtype; the student's loss projects them through the teacher's output-layer
  shard (per micro-batch, or chunk by chunk in the fused loss). Nothing of size batch x sequence x vocabulary
  is ever held: the largest kept tensor is ``B_local x R x h_t`` for the step's local examples.
- ``loss_fn`` returns the micro-batch's contribution to the *step* loss (already weighted); the schedules
  divide the returned loss by the number of micro-batches, so we return it multiplied by that number.
- No gradient finalisation happens inside a call (the model config's ``finalize_model_grads_func`` stays
  unset): a step may run several calls (distillation, replay) and finalises once (``data_parallel``); with
  overlapped DP reduction only the step's last call (``last_call``) may launch it.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from caopd_megatron.distill.batching import PackedBatch, gather_positions
from caopd_megatron.parallel.data_parallel import gradient_sync, pipeline_parallel_size, unwrap


def is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def pad_for_schedule(batches: Sequence[PackedBatch], pad_id: int, seq_multiple: int = 1) -> list[PackedBatch]:
    """``tokens``/``positions`` padded for the schedule: under PP every batch to one ``[rows, L]`` shape; the
    length (each batch's, or the common one) rounded up to ``seq_multiple`` (TP under sequence parallelism).
    Unchanged when neither applies.

    ``index``/``mask``/``targets`` keep their real rows (``index.size(0)`` is the real row count).
    """
    pipelined = pipeline_parallel_size() > 1
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


def real_rows(output: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``[rows_padded, L_padded, *]`` last-stage output -> its real rows ``[b, L_padded, *]``."""
    return output[: batch.index.size(0)]


def forward_backward(model, batches: Sequence[PackedBatch], post_fn: Callable[[torch.Tensor, int], Any], *,
                     forward_only: bool = False, collect: bool = False, hidden: bool = False,
                     last_call: bool = True) -> list:
    """Run ``batches`` (equal shapes under PP) through ``model`` on megatron's schedule.

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

    from caopd_megatron.distill.step import _HiddenCapture

    n = len(batches)
    inner = unwrap(model)

    def step(data_iterator, stage):
        i, batch = next(data_iterator)
        capture = _HiddenCapture(inner) if hidden and inner.post_process else contextlib.nullcontext()
        with capture:
            out = stage(batch.tokens, batch.positions, attention_mask=None)

        def loss_func(output, non_loss_data=False):
            if non_loss_data:
                return post_fn(output, i)
            loss = post_fn(output, i)
            # The schedule divides by the number of micro-batches; our losses are already step-weighted.
            return loss * n, {"loss": loss.detach()}

        return out, loss_func

    with contextlib.nullcontext() if forward_only else gradient_sync(model, last_call, n):
        if n == 0:
            return []
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(enumerate(batches)), model=model, num_microbatches=n,
            seq_length=batches[0].tokens.size(1), micro_batch_size=batches[0].tokens.size(0),
            forward_only=forward_only, collect_non_loss_data=collect)
    if not is_last_stage():
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
