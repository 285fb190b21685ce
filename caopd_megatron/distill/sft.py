"""Supervised (cross-entropy) loss on vocabulary shards: the warm-up's and the EMA teacher's replay loss.

Design decisions:
- Targets are distributions (soft or one-hot) over this rank's vocabulary shard, so one function serves the
  demo warm-up's soft confidence targets and plain next-token supervision.
- The log-sum-exp is assembled from a MAX all-reduce (no gradient needed) and differentiable SUM reductions
  over the model's tensor-parallel group, passed explicitly (identity in backward: each rank owns its shard);
  the vocabulary is never gathered. Padded vocabulary columns are excluded (-inf).
- ``SupervisedRows`` describes supervised rows as *data* (prompts, responses, a soft-target function) rather
  than as a loss closure, so the one step (``distill/step.py``) can micro-batch them through megatron's
  schedule and split them over data-parallel ranks in every layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from caopd_megatron.distill.batching import PackedBatch, gather_positions
from caopd_megatron.parallel.data_parallel import model_groups, unwrap

# (step row indices of a micro-batch, its packed batch, this rank's vocab shard [lo, hi)) -> [b, R, hi-lo] targets
TargetsFn = Callable[[range, PackedBatch, tuple[int, int]], torch.Tensor]


@dataclass
class SupervisedRows:
    """Rows trained with (soft) cross entropy, the mean over all their response tokens.

    ``targets_fn`` gives target distributions on the vocabulary shard for a subset of the rows (default:
    one-hot of the response tokens); it must depend only on the rows it is given, so that any micro-batch /
    data-parallel split of the rows yields the same loss.
    """

    prompts: Sequence[Sequence[int]]
    responses: Sequence[Sequence[int]]
    pad_id: int
    targets_fn: Optional[TargetsFn] = None

    def __len__(self) -> int:
        return len(self.prompts)


def vocab_shard_range(model) -> tuple[int, int]:
    """``[lo, hi)``: the global vocabulary rows of this rank's output-layer shard (on the model's TP group).

    Computed from the padded vocabulary size (megatron's equal split), so it also answers on pipeline stages
    that hold no output layer, and through a DDP wrapper.
    """
    tp = model_groups(model).tp
    per_rank = unwrap(model).vocab_size // tp.size()
    lo = tp.rank() * per_rank
    return lo, lo + per_rank


def one_hot_shard(targets: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """``[...]`` token ids -> ``[..., hi-lo]`` one-hot restricted to the shard ``[lo, hi)`` (zeros elsewhere)."""
    lo, hi = shard
    inside = (targets >= lo) & (targets < hi)
    out = torch.zeros(*targets.shape, hi - lo, device=targets.device)
    out.scatter_(-1, (targets - lo).clamp(0, hi - lo - 1).unsqueeze(-1), inside.unsqueeze(-1).float())
    return out


def vocab_parallel_soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, real_vocab_size: int,
                                      vocab_start: int, tp_group) -> torch.Tensor:
    """Per-token ``-sum_v t_v log softmax(z)_v`` for ``[..., V/tp]`` shards on ``tp_group``; targets sum to 1.

    ``tp_group``: the group the vocabulary is sharded over (``None`` or size 1: one shard)."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if tp_group is not None and tp_group.size() == 1:
        tp_group = None
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
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=tp_group)
        dot = reduce_from_tensor_model_parallel_region(dot, group=tp_group)
    return sum_exp.log() - dot


def sft_loss_from_logits(logits: torch.Tensor, batch: PackedBatch, real_vocab_size: int, shard: tuple[int, int],
                         tp_group, targets: torch.Tensor | None = None, mean: bool = True) -> torch.Tensor:
    """Cross entropy of ``[b, R, V/tp]`` response-position logits (vocabulary sharded over ``tp_group``): the
    mean over the batch's response tokens, or with ``mean=False`` their sum (the step divides by the global
    token count)."""
    if targets is None:
        targets = one_hot_shard(batch.targets, shard)
    per_tok = vocab_parallel_soft_cross_entropy(logits, targets, real_vocab_size, shard[0], tp_group)
    total = (per_tok * batch.mask).sum()
    return total / batch.mask.sum().clamp(min=1.0) if mean else total


def sft_loss(model, batch: PackedBatch, real_vocab_size: int, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over the batch's response tokens through a whole (PP = 1) model, one batch (tests,
    tools; training runs ``distill.step.supervised_step``); ``targets`` ``[b, R, V/tp]`` (default: one-hot)."""
    shard = vocab_shard_range(model)
    logits = gather_positions(model(batch.tokens, batch.positions, attention_mask=None), batch.index)
    return sft_loss_from_logits(logits, batch, real_vocab_size, shard, model_groups(model).tp, targets)
