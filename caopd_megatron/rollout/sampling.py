"""Per-token sampling: the knobs, the result record, and the choice of the next token from logits.

Design decisions:
- Padded vocabulary rows (>= the real vocab size) are cut off before sampling: they can never be drawn.
- Randomness is counter-based (``rollout/keyed_noise.py``): the token drawn for sequence i at position t is
  Gumbel-max over noise keyed by ``(seed, i, t, token)``, so a sequence's sample does not depend on which
  rows share its forward, in which slot, or on which replica.
- ``logprobs`` are the model's log-probabilities (temperature 1, untruncated) of the emitted tokens: what
  the sampled-token estimator and importance weights need, independent of the sampling knobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from caopd_megatron.rollout.keyed_noise import gumbel_argmax, row_keys


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
    """Top-k then nucleus filtering on ``[b, V]`` logits (-inf marks removed tokens); a new tensor, or
    ``logits`` itself when neither filter is on."""
    if not 0 < top_k < logits.size(-1) and top_p >= 1.0:
        return logits
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


def choose_tokens(logits: torch.Tensor, params: SamplingParams, real_vocab_size: int, seq_ids: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token ``[b]`` and its temperature-1 log-probability ``[b]`` for rows of ``logits`` ``[b, V]``
    (full, TP-gathered vocabulary); the noise of row r is keyed by (seed, ``seq_ids[r]``, ``positions[r]``)."""
    last = logits[:, :real_vocab_size].float()
    if params.temperature == 0:
        nxt = last.argmax(dim=-1)
    else:
        scaled = last if params.temperature == 1 else last / params.temperature  # x / 1 is x, bit for bit
        scores = filter_logits(scaled, params.top_k, params.top_p)
        nxt = gumbel_argmax(scores, row_keys(params.seed, seq_ids, positions))
    lp = torch.log_softmax(last, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return nxt, lp
