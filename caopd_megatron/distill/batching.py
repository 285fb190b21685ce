"""Pack prompt + response pairs into right-padded token tensors with response-position indices.

Design decisions:
- Teacher and student see different prompts but the same response, so each side is packed on its own and
  the two are aligned on *response positions*: ``index[b, j]`` is the position whose logits predict
  response token j. Gathering those positions gives ``[b, R, V/tp]`` on both sides, token-aligned.
- Right padding with causal attention: pad tokens come after every real token, so they never influence
  real positions and no attention mask is needed. Padded response slots have ``mask = 0``.
- Position ids are plain ``arange``; RoPE makes them implicit, but megatron-core's API takes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [b, L] long
    positions: torch.Tensor  # [b, L] long
    index: torch.Tensor  # [b, R] long: logits position predicting response token j
    mask: torch.Tensor  # [b, R] float: 1 for real response tokens
    targets: torch.Tensor  # [b, R] long: the response tokens (pad where mask is 0)

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.tokens, self.positions, self.index, self.mask, self.targets)))


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
         skip_first_tokens: int = 0) -> PackedBatch:
    """Concatenate each prompt with its response; ``skip_first_tokens`` masks the first n response tokens."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    b = len(prompts)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the first response token needs a position to be predicted from")
    L = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1)
    R = max((len(r) for r in responses), default=0)
    tokens = torch.full((b, max(L, 1)), pad_id, dtype=torch.long)
    index = torch.zeros(b, R, dtype=torch.long)
    mask = torch.zeros(b, R)
    targets = torch.full((b, R), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n, m = len(p), len(r)
        tokens[i, :n] = torch.as_tensor(list(p), dtype=torch.long)
        if m:
            tokens[i, n:n + m] = torch.as_tensor(list(r), dtype=torch.long)
            index[i, :m] = torch.arange(n - 1, n - 1 + m)
            mask[i, skip_first_tokens:m] = 1.0
            targets[i, :m] = torch.as_tensor(list(r), dtype=torch.long)
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand(b, -1).contiguous()
    return PackedBatch(tokens, positions, index, mask, targets)


def gather_positions(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[b, L, V/tp]`` logits, ``[b, R]`` positions -> ``[b, R, V/tp]`` (the TP shard is kept as is)."""
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
