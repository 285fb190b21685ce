"""Supervised (cross-entropy) loss on vocabulary shards: the warm-up's and the EMA teacher's replay loss.

Design decisions:
- Targets are distributions (soft or one-hot) over this rank's vocabulary shard, so one function serves the
  demo warm-up's soft confidence targets and plain next-token supervision.
- The log-sum-exp is assembled from a MAX all-reduce (no gradient needed) and differentiable SUM reductions
  over the tensor-parallel group (megatron-core's ``reduce_from_tensor_model_parallel_region``: identity in
  backward, since each rank owns its shard); the vocabulary is never gathered.
- Padded vocabulary columns are excluded (-inf), so they receive neither mass nor gradient.
"""
from __future__ import annotations

import torch

from caopd_megatron.distill.batching import PackedBatch, gather_positions


def tp_group_or_none():
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def vocab_shard_range(model) -> tuple[int, int]:
    """``[lo, hi)``: the global vocabulary rows of this rank's output-layer shard."""
    from megatron.core import parallel_state

    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight
    lo = parallel_state.get_tensor_model_parallel_rank() * weight.size(0)
    return lo, lo + weight.size(0)


def one_hot_shard(targets: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """``[...]`` token ids -> ``[..., hi-lo]`` one-hot restricted to the shard ``[lo, hi)`` (zeros elsewhere)."""
    lo, hi = shard
    inside = (targets >= lo) & (targets < hi)
    out = torch.zeros(*targets.shape, hi - lo, device=targets.device)
    out.scatter_(-1, (targets - lo).clamp(0, hi - lo - 1).unsqueeze(-1), inside.unsqueeze(-1).float())
    return out


def vocab_parallel_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, real_vocab_size: int,
                                      vocab_start: int, tp_group) -> torch.Tensor:
    """Per-token ``-sum_v t_v log softmax(z)_v`` for ``[..., V/tp]`` shards on ``tp_group``; targets sum to 1."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    z = logits.float()
    col = torch.arange(vocab_start, vocab_start + z.size(-1), device=z.device)
    z = z.masked_fill(col >= real_vocab_size, float("-inf"))
    m = z.detach().amax(dim=-1, keepdim=True)
    if tp_group is not None:
        # Maximum over the whole vocabulary, for a stable log-sum-exp.
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    sum_exp = (z - m).exp().sum(-1)
    dot = (targets * torch.where(torch.isfinite(z), z - m, torch.zeros_like(z))).sum(-1)
    if tp_group is not None:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
        dot = reduce_from_tensor_model_parallel_region(dot)
    return sum_exp.log() - dot


def sft_loss(model, batch: PackedBatch, real_vocab_size: int, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over the batch's response tokens; ``targets`` ``[b, R, V/tp]`` (default: one-hot)."""
    shard = vocab_shard_range(model)
    if targets is None:
        targets = one_hot_shard(batch.targets, shard)
    logits = gather_positions(model(batch.tokens, batch.positions, attention_mask=None), batch.index)
    per_tok = vocab_parallel_soft_cross_entropy(logits, targets, real_vocab_size, shard[0], tp_group_or_none())
    return (per_tok * batch.mask).sum() / batch.mask.sum().clamp(min=1.0)
