"""A lean forward of a GPTModel over a ``SlotKVCache``: the rollout's prefill and decode steps without
megatron-core's per-call machinery, on the same weights, with bitwise the same logits and cache.

Design decisions:
- A small model's decode step is mostly Python: megatron's parallel linears run an autograd ``Function``
  (autocast, TP-group look-ups) even under ``inference_mode``, and every layer walks its wrappers.
  ``SlotForward`` runs the torch ops those wrappers end in, in megatron's order: ``matmul(x, W.t())``,
  ``rms_norm``, the cache's ``rotate`` / ``store``, ``grouped_attention``, megatron's gated SiLU and its eval-mode
  in-place residual adds. ``tests/test_slot_forward.py`` holds it bitwise to megatron's forward.
- Only models it can copy exactly (``refusal``): TP = PP = 1, the builder's local pre-norm spec, RoPE, full
  attention. Others (TE, TP / PP > 1, OLMo-3's post-norm / sliding-window layers) keep megatron's forward.
- RoPE: the fed tokens' cos / sin are taken once per forward (megatron takes them per layer and per tensor,
  with ``mscale`` 1) and, without QK norms, the query and key heads of a group, adjacent in megatron's fused QKV
  rows, rotate in one call. Same elementwise formula (``t * cos + rotate_half(t) * sin``), same bits.
- A fresh unpadded prefill (every row's positions ``0..s-1``, nothing cached before; ``SlotKVCache.causal``)
  attends over the forward's own keys and values with torch's causal kernel instead of reading the cache
  back under an explicit mask: the same scores and softmax, bit for bit (``tests/test_slot_forward.py``).
- The embedding is the lookup megatron's ``VocabParallelEmbedding`` ends in at TP = 1 (no masking, no
  all-reduce); eval mode, so no dropout (the sampler switches the model to eval for the rollout).
- Parameters are read per rollout, as transposed views: an optimizer step updates them in place, the next
  rollout sees it.
Tensors: tokens ``[b, s]``; activations ``[s, b, h]`` as in megatron; logits ``[b, V]`` (padded vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from caopd_megatron.models.kv_cache_attention import (GroupedSlotAttention, SlotCachedSelfAttention, SlotKVCache,
                                                      grouped_attention)
from caopd_megatron.parallel.data_parallel import model_groups, unwrap


@dataclass
class _Layer:
    number: int
    attn_norm: torch.nn.RMSNorm
    mlp_norm: torch.nn.RMSNorm
    qkv_t: torch.Tensor  # [h, (heads + 2 * groups) * d] (megatron's per-group [q..., k, v] layout), a view
    qkv_bias: torch.Tensor | None
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    proj_t: torch.Tensor  # [heads * d, h]
    fc1_t: torch.Tensor  # [h, 2 * ffn] (gate columns, then linear columns)
    fc2_t: torch.Tensor  # [ffn, h]
    scale: float  # attention softmax scale


def _rms(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


def rope_factors(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, signed sin)`` of RoPE angles ``freqs`` ``[..., d]`` for ``rotate`` on ``dtype`` activations (cast
    after the float32 cos / sin, as megatron does): the sine's first half negated."""
    sin = torch.sin(freqs).to(dtype)
    half = sin.size(-1) // 2
    return torch.cos(freqs).to(dtype), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(t: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """megatron's unfused, non-interleaved RoPE (``mscale`` 1) on ``t`` ``[..., d]``: ``t * cos + [-t2, t1] * sin``.
    Written ``t * cos + [t2, t1] * [-sin1, sin2]``: a sign flip commutes with rounding, so the bits are megatron's."""
    return t * cos + t.roll(t.size(-1) // 2, dims=-1) * signed_sin


def _norm(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """A QK norm to apply, or None for megatron's absent / identity one."""
    return None if module is None or isinstance(module, IdentityOp) else module


def refusal(model) -> str | None:
    """Why ``SlotForward`` cannot reproduce ``model``'s forward exactly (None: it can)."""
    gpt = unwrap(model)
    groups = model_groups(model)
    cfg = gpt.config
    if groups.tp.size() > 1 or groups.pp.size() > 1:
        return "tensor or pipeline parallel"
    if not (gpt.pre_process and gpt.post_process) or gpt.position_embedding_type != "rope" \
            or gpt.embedding.add_position_embedding or gpt.embedding.tokentype_embeddings is not None:
        return "not a whole RoPE GPTModel"
    if cfg.multi_latent_attention or cfg.no_rope_freq or cfg.rotary_interleaved or cfg.apply_rope_fusion \
            or cfg.attention_output_gate or cfg.fp32_residual_connection \
            or cfg.activation_func is not F.silu or not cfg.gated_linear_unit or cfg.flash_decode \
            or cfg.activation_func_clamp_value is not None or cfg.fp8 or cfg.inference_fuse_tp_communication:
        return "a transformer config option it does not copy"
    if not isinstance(gpt.decoder.final_layernorm, torch.nn.RMSNorm):
        return "final norm is not torch's RMSNorm"
    for layer in gpt.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        if type(layer) is not TransformerLayer:
            return f"{type(layer).__name__} is not megatron's pre-norm TransformerLayer"
        if type(attn) is not SlotCachedSelfAttention or type(attn.core_attention) is not GroupedSlotAttention \
                or attn.core_attention.softmax_offset is not None or attn.core_attention.window:
            return "attention is not the slot cache's full local attention"
        if attn.own_rope is not None:
            return "a layer with its own (YaRN) RoPE table"
        if not all(isinstance(n, torch.nn.RMSNorm) for n in (layer.input_layernorm, layer.pre_mlp_layernorm)):
            return "layer norms are not torch's RMSNorm"
        if type(mlp) is not MLP or any(m.bias is not None for m in (attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2)):
            return "MLP or projection is not megatron's bias-free dense one"
        if attn.linear_qkv.skip_bias_add or getattr(attn.linear_qkv, "bias", None) is not None and not cfg.add_qkv_bias:
            return "QKV bias handled differently"
    return None


class SlotForward:
    """``model``'s forward on the slot cache's path, lean: ``logits(tokens, ctx, visible)`` -> ``[b, V]``."""

    def __init__(self, model):
        gpt = unwrap(model)
        self.gpt, self.cfg = gpt, gpt.config
        self.final_norm = gpt.decoder.final_layernorm
        self.embedding = gpt.embedding.word_embeddings.weight  # [V, h]
        self.output_t = (gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights
                         else gpt.output_layer.weight).t()  # [h, V]
        self.layers = []
        for layer in gpt.decoder.layers:
            attn, mlp = layer.self_attention, layer.mlp
            core = attn.core_attention
            self.layers.append(_Layer(
                attn.layer_number, layer.input_layernorm, layer.pre_mlp_layernorm, attn.linear_qkv.weight.t(),
                attn.linear_qkv.bias if self.cfg.add_qkv_bias else None, _norm(attn.q_layernorm),
                _norm(attn.k_layernorm),
                attn.linear_proj.weight.t(), mlp.linear_fc1.weight.t(), mlp.linear_fc2.weight.t(),
                core.softmax_scale * (core.scale_mask_softmax.scale or 1.0)))
        first = gpt.decoder.layers[0].self_attention
        self.groups = first.num_query_groups_per_partition
        self.per_group = first.num_attention_heads_per_partition // self.groups
        self.head_dim = first.hidden_size_per_attention_head

    def logits(self, tokens: torch.Tensor, ctx: SlotKVCache, mask: torch.Tensor) -> torch.Tensor:
        """Last-column logits ``[b, V]`` of ``tokens`` ``[b, s]`` fed as ``ctx.plan`` laid out (``mask`` is the
        plan's ``[b, 1, s, read_len]``, True = masked)."""
        hidden = F.embedding(tokens, self.embedding).transpose(0, 1).contiguous()  # [s, b, h]
        freqs = ctx.freqs(self.gpt.rotary_pos_emb(ctx.max_sequence_length))  # [s, b, 1, d]
        rope = rope_factors(freqs, hidden.dtype)
        visible = None if ctx.causal else ~mask
        for layer in self.layers:
            hidden = self._layer(layer, hidden, ctx, rope, visible)
        hidden = _rms(self.final_norm, hidden)[-1:]
        return torch.matmul(hidden, self.output_t)[0]

    def _layer(self, layer: _Layer, hidden: torch.Tensor, ctx: SlotKVCache,
               rope: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor | None) -> torch.Tensor:
        """One layer on ``hidden`` ``[s, b, h]``; ``rope``: the fed tokens' ``rope_factors`` ``[s, b, 1, d]``;
        ``visible`` ``[b, 1, s, read_len]`` (None: a fresh unpadded prefill, causal over the fed tokens)."""
        s, b, _ = hidden.shape
        d, r = self.head_dim, self.per_group
        qkv = torch.matmul(_rms(layer.attn_norm, hidden), layer.qkv_t)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qkv = qkv.view(s, b, self.groups, (r + 2) * d)
        value = qkv[..., (r + 1) * d:]
        cos, sin = rope
        if layer.q_norm is None and layer.k_norm is None:  # q and k heads of a group rotate together
            qk = rotate(qkv[..., :(r + 1) * d].unflatten(-1, (r + 1, d)), cos.unsqueeze(3), sin.unsqueeze(3))
            query, key = qk[:, :, :, :r].reshape(s, b, -1, d), qk[:, :, :, r]
        else:
            query, key = qkv[..., :r * d].reshape(s, b, -1, d), qkv[..., r * d:(r + 1) * d]
            if layer.q_norm is not None:
                query = layer.q_norm(query)
            if layer.k_norm is not None:
                key = layer.k_norm(key)
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        key, value = ctx.store(layer.number, key, value)
        attended = torch.matmul(grouped_attention(query, key, value, visible, layer.scale), layer.proj_t)
        hidden = attended.add_(hidden)
        gate, linear = torch.chunk(torch.matmul(_rms(layer.mlp_norm, hidden), layer.fc1_t), 2, dim=-1)
        mlp = torch.matmul(F.silu(gate) * (linear + self.cfg.glu_linear_offset), layer.fc2_t)
        return mlp.add_(hidden)
