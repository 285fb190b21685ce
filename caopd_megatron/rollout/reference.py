"""The no-cache reference sampler: every token from a full forward of the whole sequence so far.

Design decisions:
- One sequence at a time, no KV cache, no padding, no batching: the simplest correct rollout, against which
  the cached engine (``rollout/continuous.py``) is tested and benchmarked. Same token choice as the engine
  (``rollout.sampling.choose_tokens``: keyed noise, top-k / top-p, real vocabulary only), so for a fixed
  seed both draw the same samples up to float rounding of the logits.
- Single process only (no TP / PP / DP plumbing): tests compare parallel runs with the engine instead.
- ``near_tie`` reports, per emitted token, the gap between the best and the second-best perturbed score,
  so a test can tell a float-rounding flip (a gap near zero) from a real difference.
"""
from __future__ import annotations

from typing import Sequence

import torch

from caopd_megatron.rollout.keyed_noise import gumbel_argmax, keyed_uniform, row_keys
from caopd_megatron.rollout.sampling import Generation, SamplingParams, choose_tokens, filter_logits

__all__ = ["full_forward_logits", "generate_without_cache", "decision_margin"]


def full_forward_logits(model, ids: Sequence[int]) -> torch.Tensor:
    """Last-position logits ``[V]`` of one unpadded sequence from a plain full forward (no KV cache)."""
    tokens = torch.as_tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)
    positions = torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0)
    return model(tokens, positions, attention_mask=None)[0, -1]


def decision_margin(logits: torch.Tensor, params: SamplingParams, real_vocab_size: int, seq_id: int,
                    position: int) -> float:
    """Gap between the chosen and the runner-up (perturbed) score of one draw from ``logits`` ``[V]``."""
    last = logits[:real_vocab_size].float().unsqueeze(0)
    if params.temperature == 0:
        top = torch.topk(last[0].double(), 2).values
        return float(top[0] - top[1])
    scores = filter_logits(last / params.temperature, params.top_k, params.top_p).double()
    keys = row_keys(params.seed, torch.tensor([seq_id]), torch.tensor([position]))
    u = keyed_uniform(keys, torch.arange(scores.size(1)))
    top = torch.topk((scores - torch.log(-torch.log(u)))[0], 2).values
    return float(top[0] - top[1])


@torch.no_grad()
def generate_without_cache(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos_id: int,
                           real_vocab_size: int, seq_ids: Sequence[int] | None = None) -> list[Generation]:
    """``rollout.sampler.generate``'s samples, recomputing the whole sequence for every token."""
    if seq_ids is None:
        seq_ids = range(len(prompts))
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt, sid in zip(prompts, seq_ids):
            seq, resp, lps, finished = list(prompt), [], [], False
            for _ in range(params.max_new_tokens):
                logits = full_forward_logits(model, seq).unsqueeze(0)
                nxt, lp = choose_tokens(logits, params, real_vocab_size, torch.tensor([sid]),
                                        torch.tensor([len(seq)]))
                resp.append(int(nxt))
                lps.append(float(lp))
                seq.append(int(nxt))
                if int(nxt) == eos_id:
                    finished = True
                    break
            out.append(Generation(list(prompt), resp, lps, finished))
    finally:
        model.train(was_training)
    return out
