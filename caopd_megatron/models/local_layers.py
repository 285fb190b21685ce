"""Replacements and additions to megatron-core's local (no Transformer Engine, no apex) layer spec.

Design decisions:
- ``GroupedRowParallelLinear`` hands its matmul its own TP group (0.16 passes None, i.e. the global group).
- ``SequenceParallelRMSNorm`` is ``torch.nn.RMSNorm`` with the ``sequence_parallel`` marker that
  ``finalize_model_grads`` needs to sum its weight gradient over TP (megatron's local norm refuses SP).
- OLMo-2/3: ``PostNormTransformerLayer`` is megatron's layer plus two norms folded into its bias-dropout-add
  steps (``residual + norm(sublayer(h))``; input / pre-MLP norms are identities), so the forward stays
  megatron's own on 0.16 and 0.19. ``ProjectionRMSNorm`` normalises all heads of a q (k) projection at once:
  a TP rank holds a run of heads and its slice of the weight (TP-sharded on dim 0, checkpoints included),
  and the sum of squares is all-reduced over the attention's own TP group (``pg_collection.tp``), forward
  and backward (``AllReduceSum``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import RowParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from caopd_megatron.models.kv_cache_attention import SlotCachedSelfAttention


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


# ------------------------------------------------------------------------------------------ post-norm layers
@dataclass
class PostNormLayerSubmodules(TransformerLayerSubmodules):
    """megatron's layer submodules plus the norms applied to each sublayer's output before its residual add."""

    post_self_attn_layernorm: type | ModuleSpec = IdentityOp
    post_mlp_layernorm: type | ModuleSpec = IdentityOp


def norm_then_bias_dropout_add(norm: torch.nn.Module, bias_dropout_add):
    """A bda factory like megatron's (``factory(training, fused)(output_with_bias, residual, prob)``) that
    normalises the sublayer's output first: ``residual + dropout(norm(output))``. The sublayers carry no bias."""

    def factory(training: bool, fused: bool):
        add = bias_dropout_add(training, fused)

        def apply(output_with_bias, residual, prob):
            output, bias = output_with_bias
            if bias is not None:
                raise ValueError("post-sublayer norms need bias-free linears (add_bias_linear=False)")
            return add((norm(output), None), residual, prob)

        return apply

    return factory


class PostNormTransformerLayer(TransformerLayer):
    """megatron's ``TransformerLayer`` as ``h + norm_a(attn(h))``, then ``h + norm_m(mlp(h))`` (OLMo-2/3).

    ``hidden_states`` ``[s(/tp under SP), b, h]``; the two norms are ``[h]`` weights, replicated over TP.
    """

    def __init__(self, config, submodules: PostNormLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        norm = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm)
        self.self_attn_bda = norm_then_bias_dropout_add(self.post_self_attn_layernorm, self.self_attn_bda)
        self.mlp_bda = norm_then_bias_dropout_add(self.post_mlp_layernorm, self.mlp_bda)


def post_norm_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """The local layer ``spec`` rearranged for post-sublayer norms (``SequenceParallelRMSNorm``, which is
    torch's RMSNorm with the SP marker set only under sequence parallelism); input / pre-MLP norms removed."""
    layer = spec.submodules
    kept = {f.name: getattr(layer, f.name) for f in fields(TransformerLayerSubmodules)}
    submodules = PostNormLayerSubmodules(**{**kept, "input_layernorm": IdentityOp, "pre_mlp_layernorm": IdentityOp},
                                         post_self_attn_layernorm=SequenceParallelRMSNorm,
                                         post_mlp_layernorm=SequenceParallelRMSNorm)
    return ModuleSpec(module=PostNormTransformerLayer, params=dict(spec.params), submodules=submodules)


# ------------------------------------------------------------------------------------- QK norm over all heads
class AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in the forward, and sum of the incoming gradients in the backward: each rank's copy
    of the sum feeds that rank's own heads, so the gradient of the sum is every rank's contribution added up."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over all ``n * d`` features of a q or k projection, applied to this TP rank's heads.

    ``forward``: ``[s, b, n/tp, d]`` -> same shape; the mean square is over the whole projection (this rank's
    sum of squares all-reduced over ``tp_group``). ``weight``: ``[n/tp * d]``, this rank's contiguous slice
    of the global ``[n * d]`` weight (TP-sharded on dim 0).
    """

    def __init__(self, size: int, tp_group, eps: float, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tp = tp_group.size()
        if size % tp:
            raise ValueError(f"QK norm over {size} features cannot be split over TP={tp}")
        self.size, self.eps, self.tp_group = size, eps, tp_group
        self.weight = torch.nn.Parameter(torch.ones(size // tp, dtype=params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        flat = heads.reshape(*heads.shape[:-2], -1).float()  # [s, b, n/tp * d]
        square_sum = flat.pow(2).sum(-1, keepdim=True)
        if self.tp_group.size() > 1:
            square_sum = AllReduceSum.apply(square_sum, self.tp_group)  # over the whole projection
        normed = flat * torch.rsqrt(square_sum / self.size + self.eps)
        return (self.weight * normed).to(heads.dtype).view_as(heads)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The weight as one global ``[n * d]`` tensor sharded over TP on dim 0."""
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=(metadata or {}).get("dp_cp_group"))


class ProjectionQKNormSelfAttention(SlotCachedSelfAttention):
    """``SlotCachedSelfAttention`` whose ``q_layernorm`` / ``k_layernorm`` are ``ProjectionRMSNorm``s over
    all query (key) heads, reduced over this attention's own TP group. The spec leaves both norms unset."""

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        tp, head_dim = self.pg_collection.tp, self.hidden_size_per_attention_head
        groups = config.num_query_groups or config.num_attention_heads
        if groups % tp.size():
            raise ValueError(f"QK norm over the whole projection needs TP ({tp.size()}) to divide the "
                             f"key/value heads ({groups})")
        eps, dtype = config.layernorm_epsilon, config.params_dtype
        self.q_layernorm = ProjectionRMSNorm(config.num_attention_heads * head_dim, tp, eps, dtype)
        self.k_layernorm = ProjectionRMSNorm(groups * head_dim, tp, eps, dtype)
