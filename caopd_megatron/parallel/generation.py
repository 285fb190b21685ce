"""Autoregressive decoding through a pipeline: each stage runs its layers, hidden states go stage to stage.

Design decisions:
- The sampler (``rollout/continuous.py``) keeps its algorithm (prefill, then one token per live row per step,
  a ``SlotKVCache`` as KV cache); under PP each forward call becomes
  ``stage_forward``: a non-first stage receives the previous stage's ``[s, b, h]`` activations by p2p
  (``recv`` from the previous pipeline rank), runs its layers with its own KV cache, and sends its output on;
  only the last stage has logits. Sampling happens on the last stage (same keyed noise, same draws as one
  process) and the chosen tokens and their log-probabilities are broadcast over the pipeline group, so every
  stage returns identical generations (and, after the DP all-gather, every rank holds the whole rollout).
- One micro-batch at a time (``rollout.pipeline_microbatches=1``): blocking ``send``/``recv`` and a broadcast
  of the draws; stage k+1 needs stage k's output of the same step, so stages idle while others compute.
  With several micro-batches in flight (``rollout/pipelined.py``) activations leave by ``isend`` (``sends``
  collects the pending works) and the last stage sends the draws straight back to every other stage
  (``send_draws`` / ``recv_draws``), so a stage never waits on a send and no collective couples the stages.
  The shapes are known on both sides (the step's new tokens x batch x hidden; the forward's draw count), so
  no shape exchange is needed.
- Sequence parallelism is off while decoding (``sequence_parallel_off``): a decode step feeds one token per
  sequence, which cannot be split over TP ranks, and megatron's own inference runs dense layers without it.
  The switch is megatron's per-module attributes (what its ``set_model_to_sequence_parallel`` flips), saved
  and restored exactly rather than reset to one value, so training resumes with the layers as built.
- Data-parallel replicas split the batches (``rollout/sampler.py``); each replica's pipeline decodes its own
  share with this code, and the replicas' results are all-gathered over DP afterwards.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from caopd_megatron.parallel.data_parallel import broadcast_from_last_stage, is_last_stage, model_groups, unwrap, uses_sequence_parallel

ACTIVATIONS, DRAWS = 0, 1  # p2p tags: a stage's output to the next stage; the last stage's draws to the others


def stage_forward(model, tokens: torch.Tensor, positions: torch.Tensor, inference_context,
                  attention_mask: torch.Tensor | None = None, sends: list | None = None) -> torch.Tensor | None:
    """One decoding forward of this stage for ``tokens`` ``[b, s]``; returns ``[b, s', V]`` logits (gathered
    over TP; megatron keeps the last position only) on the last stage, ``None`` on the others. Activations
    travel over the model's pipeline group; with ``sends`` (a list) the output leaves by ``isend`` and its
    work is appended there (the caller waits on it), else by a blocking ``send``."""
    inner = unwrap(model)
    pp = model_groups(model).pp
    if pp.rank() > 0:
        b, s = tokens.shape
        hidden = torch.empty((s, b, inner.config.hidden_size), dtype=inner.config.params_dtype,
                             device=tokens.device)
        dist.recv(hidden, src=dist.get_global_rank(pp, pp.rank() - 1), group=pp, tag=ACTIVATIONS)
        inner.set_input_tensor(hidden)
    out = model(tokens, positions, attention_mask=attention_mask, inference_context=inference_context,
                runtime_gather_output=True)
    if not is_last_stage(model_groups(model)):
        nxt = dist.get_global_rank(pp, pp.rank() + 1)
        if sends is None:
            dist.send(out.contiguous(), dst=nxt, group=pp, tag=ACTIVATIONS)
        else:
            sends.append(dist.isend(out.contiguous(), dst=nxt, group=pp, tag=ACTIVATIONS))
        return None
    return out


def send_draws(tokens: torch.Tensor, logprobs: torch.Tensor, groups, sends: list) -> None:
    """From the last stage: ``tokens`` ``[n]`` (int64) and their ``logprobs`` ``[n]`` (float32) to every other
    stage of the pipeline group, by ``isend`` of one ``[2n]`` float64 tensor (exact for both); works into ``sends``."""
    message = torch.cat([tokens.double(), logprobs.double()])
    pp = groups.pp
    for stage in range(pp.size() - 1):
        sends.append(dist.isend(message, dst=dist.get_global_rank(pp, stage), group=pp, tag=DRAWS))


def recv_draws(n: int, groups, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """On a stage before the last: the next ``n`` draws ``send_draws`` sent, as (tokens ``[n]``, logprobs ``[n]``)."""
    message = torch.empty(2 * n, dtype=torch.float64, device=device)
    pp = groups.pp
    dist.recv(message, src=dist.get_global_rank(pp, pp.size() - 1), group=pp, tag=DRAWS)
    return message[:n].long(), message[n:].float()


# Module attributes megatron consults for sequence parallelism (embedding scatter, linear layers' gathers).
_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_off(model):
    """Run the block with ``model``'s sequence parallelism switched off (a no-op without it)."""
    if not uses_sequence_parallel(model):
        yield
        return
    inner = unwrap(model)
    saved = [(m, a, getattr(m, a)) for m in inner.modules() for a in _SP_ATTRS if hasattr(m, a)]
    for m, a, _ in saved:
        setattr(m, a, False)
    inner.config.sequence_parallel = False
    try:
        yield
    finally:
        inner.config.sequence_parallel = True
        for m, a, value in saved:
            setattr(m, a, value)


def broadcast_step(tokens: torch.Tensor, logprobs: torch.Tensor, groups) -> None:
    """Every stage gets the last stage's chosen ``tokens`` ``[b]`` and their ``logprobs`` ``[b]`` (in place),
    over the pipeline group of ``groups`` (a ``ProcessGroupCollection``)."""
    broadcast_from_last_stage(tokens, groups)
    broadcast_from_last_stage(logprobs, groups)
