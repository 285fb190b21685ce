"""Replacements in megatron-core's local (no Transformer Engine, no apex) layer spec.

Design decisions:
- ``GroupedRowParallelLinear``: megatron-core 0.16's ``RowParallelLinear.forward`` hands ``tp_group=None`` to
  its matmul, which falls back to the global group with a deprecation warning; this subclass passes its own
  (explicit) group. Nothing else changes: that matmul does not communicate (the reduction follows it).
- ``SequenceParallelRMSNorm``: megatron-core's local norm (``WrappedTorchNorm``) refuses ``sequence_parallel``: under it a layer norm sees
  only this TP rank's slice of the sequence, so its weight gradient is partial and must be summed over TP,
  and the torch module does not carry the marker megatron looks for. TE's and apex's norms set it; this one
  is ``torch.nn.RMSNorm`` with the marker (``weight.sequence_parallel = True``), which is all
  ``finalize_model_grads`` needs to all-reduce the gradient over the TP group. Forward is torch's.
- Used only where needed: the builder swaps it into the local spec (every layer's input / pre-MLP norm, the
  QK norms and the final norm) when sequence parallelism is on; otherwise megatron's spec is untouched, and
  the TE spec never uses it.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import RowParallelLinear


class GroupedRowParallelLinear(RowParallelLinear):
    """megatron's ``RowParallelLinear`` whose matmul gets the layer's own TP group instead of ``None``."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over ``[..., hidden]`` whose weight is marked for the TP gradient sum under SP.

    Constructed like megatron's norms: ``(config, hidden_size, eps, ...)``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm is an RMSNorm; the config asks for {config.normalization}")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
