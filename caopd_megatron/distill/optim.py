"""Optimizer, learning-rate schedule and model-parallel-aware gradient clipping.

Design decisions:
- AdamW with linear warm-up then cosine decay to ``min_lr`` (or constant), as a ``LambdaLR`` so its state
  is a plain dict that checkpoints round-trip.
- Gradient clipping computes the global norm over the whole model: squared norms of this rank's shards are
  summed over the model-parallel group (TP x PP), counting TP-duplicated parameters (norms, replicated
  biases) on one TP rank only, and the last pipeline stage's copy of a tied word embedding (megatron marks it
  ``shared``) not at all. Every rank then scales by the same factor, so TP/PP runs clip exactly like a
  single process. Data-parallel replicas hold identical (already reduced) gradients and are not summed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from caopd_megatron.config.schema import OptimConfig


def build_optimizer(params, cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr if lr is None else lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig, base_lr: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total_steps, cfg, base))


def _is_tp_duplicate(p: torch.nn.Parameter) -> bool:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return False
    return not getattr(p, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_rank() > 0


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip gradients in place to a global L2 norm of ``max_norm``; returns the norm before clipping."""
    from megatron.core import parallel_state

    grads = [p.grad for p in params if p.grad is not None]
    # ``shared``: the last stage's duplicate of a tied embedding under PP; its twin on stage 0 is counted.
    counted = [p.grad for p in params if p.grad is not None and not _is_tp_duplicate(p)
               and not getattr(p, "shared", False)]
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in counted:
        sq += g.detach().float().pow(2).sum()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        # Sum of squared norms over every shard of the model (TP x PP), not over data-parallel replicas.
        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        torch._foreach_mul_(grads, scale)
    return norm
