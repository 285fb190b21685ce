"""Batched autoregressive sampling from a megatron-core GPTModel: the rollout's entry point.

Design decisions:
- ``generate`` takes a flat list of prompts (a prompt repeated K times for K samples) and returns one
  ``Generation`` per entry, in order. Identical prompts are grouped (``rollout.continuous.group_prompts``):
  each distinct prompt is prefilled once and its KV cache copied to its samples.
- Decoding is continuous batching on megatron's static-batching path (``rollout/continuous.py``): a cache of
  ``batch_size`` slots whose keys are stored already rotated (``rollout/kv_cache.py``), mixed prompt lengths
  prefilled in one padded forward, finished rows retired and their slots refilled from the queue.
- Randomness is counter-based (``rollout/keyed_noise.py``, ``rollout/sampling.py``): sequence i's token at
  position t is keyed by ``(seed, i, t)``. ``seq_ids`` default to the prompt's index. A sequence's sample is
  then the same whatever batch or slot it shares, however the prompts are split over data-parallel
  replicas, and on every tensor-parallel rank (logits are gathered over TP for the last position only).
- ``engine="dynamic"`` runs each replica's share through megatron-core's dynamic engine instead, with the same
  keyed draws (``rollout/dynamic.py``); the DP deal and gather are the same.
- Sequence parallelism is switched off for the call (``parallel.generation.sequence_parallel_off``).
- Under pipeline parallelism the rows are split into micro-batches in flight, one per stage by default
  (``rollout/pipelined.py``): every stage works on a different one at each tick; the last stage samples and
  sends the tokens back, so every rank returns the same generations as a single process would.
- Under data parallelism the replicas split the work (``parallel.data_parallel.round_robin_dp``): the
  length-sorted prompt groups are packed into units of ``batch_size`` sequences and dealt round-robin (a
  group is never split between replicas), each replica decodes its share, and the results are all-gathered.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from caopd_megatron.parallel.data_parallel import all_gather_dp, data_parallel_size, model_groups, round_robin_dp
from caopd_megatron.parallel.generation import sequence_parallel_off
from caopd_megatron.rollout.continuous import PromptGroup, decode_groups, group_prompts
from caopd_megatron.rollout.dynamic import decode_dynamic
from caopd_megatron.rollout.sampling import Generation, SamplingParams, filter_logits  # noqa: F401 (public API)

log = logging.getLogger(__name__)


def _gather_over_dp(local: dict[int, Generation], prompts: Sequence[Sequence[int]], device: torch.device,
                    groups) -> dict[int, Generation]:
    """Every data-parallel replica's generations (``{prompt index: Generation}``), on every rank.

    Packed as three flat tensors per replica (``[n, 3]`` index / length / finished, the response tokens, their
    float32 log-probabilities, exact as the sampler stored them) rather than pickled objects: a rollout of
    thousands of long responses is megabytes of tensors instead of a Python-object pickle per rank.
    """
    if data_parallel_size(groups) == 1:
        return local
    idx = sorted(local)
    meta = torch.tensor([[i, len(local[i].response_ids), int(local[i].finished)] for i in idx],
                        dtype=torch.long, device=device).reshape(-1, 3)
    tokens = torch.tensor([t for i in idx for t in local[i].response_ids], dtype=torch.long, device=device)
    logprobs = torch.tensor([x for i in idx for x in local[i].logprobs], dtype=torch.float32, device=device)
    metas = all_gather_dp(meta, groups)
    lengths = [int(m[:, 1].sum()) for m in metas]  # every replica's token count, known from its meta
    out: dict[int, Generation] = {}
    for m, tok, lp in zip(metas, all_gather_dp(tokens, groups, lengths), all_gather_dp(logprobs, groups, lengths)):
        ends = m[:, 1].cumsum(0).tolist()
        for (i, n, fin), end in zip(m.tolist(), ends):
            out[i] = Generation(list(prompts[i]), tok[end - n: end].tolist(), lp[end - n: end].tolist(), bool(fin))
    return out


def pack_units(groups: Sequence[PromptGroup], batch_size: int) -> list[list[PromptGroup]]:
    """Consecutive groups packed into work units of at most ``batch_size`` sequences (the DP deal)."""
    units: list[list[PromptGroup]] = []
    size = batch_size
    for g in groups:
        if size + len(g.members) > batch_size:
            units.append([])
            size = 0
        units[-1].append(g)
        size += len(g.members)
    return units


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int, real_vocab_size: int,
             batch_size: int = 256, desc: str | None = None, seq_ids: Sequence[int] | None = None,
             pipeline_microbatches: int = 0, engine: str = "static") -> list[Generation]:
    """Sample one response per prompt (repeat a prompt K times for K samples).

    Args:
        model: this rank's megatron-core GPTModel stage (possibly DDP-wrapped), built by ``models.builder``
            (its attention serves the rollout cache); any TP / PP / DP size (all ranks must call with the same
            arguments; every rank returns the same generations, data-parallel replicas each decoding a share).
        prompts: token ids per prompt.
        batch_size: cache slots, i.e. sequences decoded together.
        desc: label of a progress bar over decode steps (None: silent).
        seq_ids: the key of each prompt's sampling noise (default: its index); equal ids and seeds give
            equal samples of the same prompt.
        pipeline_microbatches: under PP, micro-batches in flight (0: one per stage; 1: one at a time).
        engine: ``static`` (the slot-cache engine) or ``dynamic`` (megatron-core's dynamic engine, CUDA only;
            ``rollout/dynamic.py``), as resolved from ``rollout.engine`` at start-up.
    Returns: generations in the order of ``prompts``.
    """
    if not prompts:
        return []
    if seq_ids is None:
        seq_ids = range(len(prompts))
    if len(seq_ids) != len(prompts):
        raise ValueError(f"seq_ids has {len(seq_ids)} entries for {len(prompts)} prompts")
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    units = pack_units(group_prompts(prompts, seq_ids, batch_size), batch_size)
    groups = model_groups(model)
    replicas = data_parallel_size(groups)
    if len(units) < replicas:
        log.info("%d generation units of <= %d sequences for %d data-parallel replicas: %d replicas idle "
                 "(a smaller batch size spreads the work)", len(units), batch_size, replicas, replicas - len(units))
    mine = [g for unit in round_robin_dp(units, groups) for g in unit]
    was_training = model.training
    model.eval()
    try:
        with sequence_parallel_off(model):
            decode = decode_dynamic if engine == "dynamic" else decode_groups
            results = decode(model, mine, params, eos_id, real_vocab_size, batch_size, device, desc,
                             pipeline_microbatches)
    finally:
        model.train(was_training)
    results = _gather_over_dp(results, prompts, device, groups)
    return [results[i] for i in range(len(prompts))]
