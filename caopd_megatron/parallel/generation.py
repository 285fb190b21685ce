"""Autoregressive decoding through a pipeline: each stage runs its layers, hidden states go stage to stage.

Design decisions:
- The sampler (``rollout/sampler.py``) keeps its algorithm (shared-prefix prefill, then one token per step,
  megatron's ``StaticInferenceContext`` as KV cache); under PP each forward call becomes
  ``stage_forward``: a non-first stage receives the previous stage's ``[s, b, h]`` activations by p2p
  (``recv`` from the previous pipeline rank), runs its layers with its own KV cache, and sends its output on;
  only the last stage has logits. Sampling happens on the last stage (same keyed noise, same draws as one
  process) and the chosen tokens and their log-probabilities are broadcast over the pipeline group, so every
  stage returns identical generations (and, after the DP all-gather, every rank holds the whole rollout).
- Blocking ``send``/``recv`` are enough: decoding is strictly sequential (stage k+1 needs stage k's output of
  the same step), so there is nothing to overlap; the shapes are known on both sides (the step's new tokens x
  batch x hidden), so no shape exchange is needed.
- Cost: one p2p of ``[new tokens, b, h]`` per stage boundary and one broadcast of ``2 x b`` numbers per decoded
  token. Stages idle while others compute (no micro-batch interleaving across generation batches): simple and
  exactly equal to the single-process sampler, which is what this path is for; a production rollout fleet
  would use megatron's inference engine or a dedicated server.
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


def stage_forward(model, tokens: torch.Tensor, positions: torch.Tensor, inference_context) -> torch.Tensor | None:
    """One decoding forward of this stage for ``tokens`` ``[b, s]``; returns ``[b, s, V]`` logits (gathered over
    TP) on the last stage, ``None`` on the others. Activations travel over the model's pipeline group."""
    inner = unwrap(model)
    pp = model_groups(model).pp
    if pp.rank() > 0:
        b, s = tokens.shape
        hidden = torch.empty((s, b, inner.config.hidden_size), dtype=inner.config.params_dtype,
                             device=tokens.device)
        dist.recv(hidden, src=dist.get_global_rank(pp, pp.rank() - 1))
        inner.set_input_tensor(hidden)
    out = model(tokens, positions, attention_mask=None, inference_context=inference_context,
                runtime_gather_output=True)
    if not is_last_stage(model_groups(model)):
        dist.send(out.contiguous(), dst=dist.get_global_rank(pp, pp.rank() + 1))
        return None
    return out


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
