"""Batched autoregressive sampling from a megatron-core GPTModel with a KV cache.

Design decisions:
- The KV cache is megatron-core's own ``StaticInferenceContext``, so the same attention code path serves
  training and generation (and a TE model on GPU gets its fused kernels).
- Prompts of different lengths share a batch without padding: the batch is prefilled up to the shortest
  prompt, then decoded one position at a time; a row still inside its prompt is fed its next prompt token
  instead of the sample (megatron's static engine does the same). Nothing is ever attended through padding,
  so no attention mask is needed and outputs equal an unbatched run.
- Padded vocabulary rows (>= the real vocab size) are cut off before sampling: they can never be drawn.
- Randomness is counter-based (``rollout/keyed_noise.py``): the token drawn for sequence i at position t is
  Gumbel-max over noise keyed by ``(seed, i, t, token)``, not the next draws of a generator stream. A
  sequence's sample is then the same whatever batch it shares, however the prompts are split over
  data-parallel replicas, and on every tensor-parallel rank (logits are gathered over TP for the last
  position only, which megatron-core requires in inference mode). ``seq_ids`` default to the prompt's index.
- Sequence parallelism is switched off for the call (``parallel.generation.sequence_parallel_off``).
- Under pipeline parallelism each forward runs stage by stage (``parallel.generation``): the last stage
  samples and broadcasts the tokens, so every rank returns the same generations as a single process would.
- Under data parallelism the replicas split the work (``parallel.data_parallel.round_robin_dp``): the length-sorted
  batches are dealt round-robin, each replica generates its own, and the results are all-gathered over DP.
  Batches have the single-process composition, so even the logits are bitwise the single-process ones.
- ``logprobs`` are the model's log-probabilities (temperature 1, untruncated) of the emitted tokens: what
  the sampled-token estimator and importance weights need, independent of the sampling knobs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from caopd_megatron.parallel.data_parallel import (all_gather_dp, data_parallel_size, model_groups,
                                                   pipeline_parallel_size, round_robin_dp)
from caopd_megatron.parallel.generation import broadcast_step, sequence_parallel_off, stage_forward
from caopd_megatron.rollout.keyed_noise import gumbel_argmax, row_keys
from caopd_megatron.runtime.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 8
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]  # includes the EOS token when one was emitted
    logprobs: list[float] = field(default_factory=list)  # one per response token
    finished: bool = False  # emitted EOS within max_new_tokens


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering on ``[b, V]`` logits (returns a new tensor; -inf marks removed tokens)."""
    out = logits.clone()
    if top_k > 0 and top_k < out.size(-1):
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always survives).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out[drop] = float("-inf")
    return out


def _sample(logits: torch.Tensor, params: SamplingParams, seq_ids: torch.Tensor, position: int) -> torch.Tensor:
    """One token per row of ``logits`` ``[b, V]``; the noise is keyed by (seed, ``seq_ids`` ``[b]``, position)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    keys = row_keys(params.seed, seq_ids, torch.full_like(seq_ids, position))
    return gumbel_argmax(scores, keys)


@torch.no_grad()
def _generate_batch(model, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_id: int,
                    real_vocab_size: int, seq_ids: torch.Tensor, device: torch.device) -> list[Generation]:
    from megatron.core.inference.contexts import StaticInferenceContext

    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    total = int(lens.max()) + params.max_new_tokens
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    positions = torch.arange(total, device=device).unsqueeze(0).expand(b, -1)
    logprobs = torch.zeros(b, total, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    end = lens + params.max_new_tokens  # exclusive end of each row's response window
    finished = torch.zeros(b, dtype=torch.bool, device=device)

    ctx = StaticInferenceContext(b, total)
    start = int(lens.min())
    cur = 0
    groups = model_groups(model)
    pipelined = pipeline_parallel_size(groups) > 1
    for t in range(start, total):
        # Feed what the cache has not seen yet: the shared prompt prefix first, then one token per step.
        if pipelined:
            logits = stage_forward(model, tokens[:, cur:t], positions[:, cur:t], ctx)  # None before the last stage
        else:
            logits = model(tokens[:, cur:t], positions[:, cur:t], attention_mask=None, inference_context=ctx,
                           runtime_gather_output=True)
        ctx.increment_sequence_len_offset(t - cur)
        if cur == 0:
            ctx.enable_decode_mode()
        cur = t
        in_prompt = t < lens
        if logits is not None:
            # Only the real vocabulary: padded rows (their number depends on TP) can never be drawn.
            last = logits[:, -1, :real_vocab_size].float()
            nxt = _sample(last, params, seq_ids, t)
            nxt = torch.where(in_prompt, tokens[:, t], nxt)
            lp = torch.log_softmax(last, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        else:
            nxt = torch.empty(b, dtype=torch.long, device=device)
            lp = torch.empty(b, dtype=torch.float32, device=device)
        if pipelined:
            # Only the last stage samples; every stage needs the tokens (the first feeds them next step).
            broadcast_step(nxt, lp, groups)
        active = ~in_prompt & ~done & (t < end)
        logprobs[:, t] = torch.where(active, lp, torch.zeros_like(lp))
        tokens[:, t] = torch.where(in_prompt | active, nxt, torch.full_like(nxt, eos_id))
        hit_eos = active & (nxt == eos_id)
        finished |= hit_eos
        done |= hit_eos | (~in_prompt & (t + 1 >= end))
        if bool(done.all()):
            break

    out = []
    for i, p in enumerate(prompts):
        n = len(p)
        resp = tokens[i, n: int(end[i])].tolist()
        lps = logprobs[i, n: int(end[i])].tolist()
        if eos_id in resp:  # cut after the first EOS
            k = resp.index(eos_id) + 1
            resp, lps = resp[:k], lps[:k]
        out.append(Generation(list(p), resp, lps, bool(finished[i])))
    return out


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
    for m, tok, lp in zip(metas, all_gather_dp(tokens, groups, lengths),
                            all_gather_dp(logprobs, groups, lengths)):
        ends = m[:, 1].cumsum(0).tolist()
        for (i, n, fin), end in zip(m.tolist(), ends):
            out[i] = Generation(list(prompts[i]), tok[end - n: end].tolist(), lp[end - n: end].tolist(), bool(fin))
    return out


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int, real_vocab_size: int,
             batch_size: int = 256, desc: str | None = None, seq_ids: Sequence[int] | None = None) -> list[Generation]:
    """Sample one response per prompt (repeat a prompt K times for K samples).

    Args:
        model: this rank's megatron-core GPTModel stage (possibly DDP-wrapped); any TP / PP / DP size (all ranks
            must call with the same arguments; every rank returns the same generations, data-parallel replicas
            each generating a share of the batches).
        prompts: token ids per prompt.
        batch_size: sequences per forward; prompts are sorted by length so batches stay homogeneous.
        seq_ids: the key of each prompt's sampling noise (default: its index); equal ids and seeds give
            equal samples of the same prompt.
    Returns: generations in the order of ``prompts``.
    """
    if not prompts:
        return []
    if seq_ids is None:
        seq_ids = range(len(prompts))
    if len(seq_ids) != len(prompts):
        raise ValueError(f"seq_ids has {len(seq_ids)} entries for {len(prompts)} prompts")
    device = next(model.parameters()).device
    ids = torch.as_tensor(list(seq_ids), dtype=torch.long, device=device)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    groups = model_groups(model)
    replicas = data_parallel_size(groups)
    if len(batches) < replicas:
        log.info("%d generation batches of <= %d sequences for %d data-parallel replicas: %d replicas idle "
                 "(a smaller batch size spreads the work)", len(batches), batch_size, replicas,
                 replicas - len(batches))
    results: dict[int, Generation] = {}
    was_training = model.training
    model.eval()
    try:
        with sequence_parallel_off(model):
            for idx in progress(round_robin_dp(batches, groups), desc=desc, unit="batch"):
                batch = _generate_batch(model, [prompts[i] for i in idx], params, eos_id, real_vocab_size,
                                        ids[idx], device)
                results.update(zip(idx, batch))
    finally:
        model.train(was_training)
    results = _gather_over_dp(results, prompts, device, groups)
    return [results[i] for i in range(len(prompts))]
