"""A slot-addressed static KV cache for rollouts, and the self-attention that reads and writes it.

Design decisions:
- ``SlotKVCache`` is a megatron-core ``StaticInferenceContext`` (so ``GPTModel`` keeps its static-batching
  behaviour: last-token logits only), but each batch row is a *slot* with its own length. A forward names the
  slots it feeds and the cache position of every token it feeds (``plan``); slots start at position 0, so a
  token's cache position is its RoPE position, whatever its slot's neighbours hold.
- Keys enter the cache already rotated: ``SlotCachedSelfAttention`` rotates the new keys at their own
  positions before writing them and returns no key embedding, so megatron's attention rotates the queries
  only. megatron's own static path keeps unrotated keys and re-rotates the whole cache every step (most of a
  decode step's time with long prompts). Same RoPE function, same per-position angles: the rotated keys are
  elementwise the ones megatron would have produced.
- Mixed prompt lengths prefill in one forward, left-padded: pad tokens are written to a spare "trash"
  position past the end that no read covers, so the last column holds every row's last prompt token (the
  logits megatron materialises). A boolean mask ``[b, 1, s, read_len]`` (True = masked, megatron's
  convention) hides cache positions after each token's own position; masked scores become exact zeros.
- Shared prompts are prefilled once and copied (``copy_slots``) into the slots of their other samples; finished
  rows retire (the last live slot is copied into the hole), so live slots stay ``0..n-1`` and a decode
  step reads a view of the cache, never a gather.
- The local spec's core attention on this path is torch's fused ``scaled_dot_product_attention`` with
  grouped-query heads (``GroupedSlotAttention``): megatron's local ``DotProductAttention`` repeats every
  cached key and value head for its query heads at each step (a copy of the cache per layer) and
  materialises the scores; same scale and mask, float rounding aside. TE's attention handles GQA itself.
- Sliding-window layers (``TransformerConfig.window_size`` = ``(window - 1, 0)`` on the layers its
  ``window_attn_skip_freq`` list marks) always take that fused path with an explicit mask: megatron's local
  softmax applies the window only on its unfused path and drops any other mask when it does. A key is outside
  a query's window when it lies ``window`` or more positions before it; on the slot cache's path a row's
  mask is a prefix (positions ``0..p`` visible), so key ``j`` is outside exactly when key ``j + window`` is
  still visible.
- Only the subclasses behave differently, and only on the slot cache's path (a ``SlotKVCache`` handed to the
  self-attention, the ``arbitrary`` mask type it returns to the core attention): training, plain forwards
  and megatron's own inference contexts take megatron's code unchanged.
Buffers: ``[slots, max_len + 1, query groups / TP, head dim]`` per layer, on this rank's TP shard of heads
and this pipeline stage's layers. Slot-major: attention reads each row's keys as one contiguous block (torch's
fused attention ran 1.3-2x faster on it than on position-major buffers at 576 cached positions).
"""
from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from caopd_megatron.models.rope import YarnRope


class SlotKVCache(StaticInferenceContext):
    """KV cache of ``slots`` rows of up to ``max_len`` tokens each (plus one trash position for pads)."""

    def __init__(self, slots: int, max_len: int):
        super().__init__(slots, max_len + 1)  # rotary tables span the trash position too
        self.trash = max_len
        self.rows: torch.Tensor | None = None  # [b] slots fed by this forward; None = slots 0..b-1
        self.write_pos: torch.Tensor | None = None  # [b, s] cache position (= RoPE position) of each token
        self.write_index: torch.Tensor | None = None  # [s*b] flat (slot, position) index of each token
        self.read_len = 0
        self.causal = False  # this forward is a fresh unpadded prefill: every row at positions 0..s-1, read_len s
        self._freqs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(table) -> (table, angles)

    def plan(self, write_pos: torch.Tensor, read_len: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Set the next forward's layout; returns its attention mask ``[b, 1, s, read_len]`` (True = masked).

        ``write_pos`` ``[b, s]``: cache position of each fed token (``self.trash`` for padding); ``read_len``:
        cache positions the forward attends over; ``rows`` ``[b]``: the slots fed (None: slots ``0..b-1``).
        Everything every layer needs (the flat write index, the RoPE angles) is derived once per forward.
        """
        b = write_pos.size(0)
        self.rows, self.read_len = rows, read_len
        slots = rows if rows is not None else torch.arange(b, device=write_pos.device)
        self.write_index = (write_pos.t() + slots * self.max_sequence_length).reshape(-1)  # [s*b] into [S*(L+1)]
        self.write_pos, self._freqs = write_pos, {}
        keys = torch.arange(read_len, device=write_pos.device)
        self.causal = read_len == write_pos.size(1) and bool((write_pos == keys).all())
        return keys.view(1, 1, 1, -1) > write_pos.unsqueeze(1).unsqueeze(-1)

    def freqs(self, table: torch.Tensor) -> torch.Tensor:
        """RoPE angles ``[s, b, 1, d]`` of the fed tokens from a ``[L, 1, 1, d]`` table (once per forward and
        table: layers of different RoPE kinds hold different tables)."""
        cached = self._freqs.get(id(table))
        if cached is None or cached[0] is not table:
            b, s = self.write_pos.shape
            cached = self._freqs[id(table)] = (table, table[self.write_pos.t().reshape(-1)].view(s, b, 1, table.size(-1)))
        return cached[1]

    def buffers(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``(K, V)`` buffers, allocated on first use like ``key`` / ``value`` ``[s, b, g, d]``."""
        if layer not in self.key_value_memory_dict:
            shape = lambda t: (self.max_batch_size, self.max_sequence_length, t.size(2), t.size(3))  # noqa: E731
            self.key_value_memory_dict[layer] = (torch.zeros(shape(key), dtype=key.dtype, device=key.device),
                                                 torch.zeros(shape(value), dtype=value.dtype, device=value.device))
        return self.key_value_memory_dict[layer]

    def rotate(self, t: torch.Tensor, table: torch.Tensor, config, cp_group) -> torch.Tensor:
        """megatron's RoPE on ``t`` ``[s, b, heads, d]`` at the fed tokens' positions (``table``: megatron's
        ``[L, 1, 1, d]`` angles): the keys before they are stored, and the queries on the lean path."""
        return apply_rotary_pos_emb(t, self.freqs(table), config=config, cp_group=cp_group)

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the fed tokens' rotated ``key`` and ``value`` ``[s, b, g, d]`` at their planned positions and
        return what the forward attends over: ``[read_len, b, g, d]`` each (a view of the slot-major buffers when
        the fed slots are ``0..b-1``, a gather of the planned rows otherwise; a fresh unpadded prefill's own
        ``key`` and ``value``, which are exactly those cache positions, when ``causal``)."""
        k_buf, v_buf = self.buffers(layer, key, value)
        s, b, groups, dim = key.shape
        k_buf.view(-1, groups, dim).index_copy_(0, self.write_index, key.reshape(s * b, groups, dim))
        v_buf.view(-1, groups, v_buf.size(-1)).index_copy_(0, self.write_index, value.reshape(s * b, groups, -1))
        if self.causal:
            return key, value
        rows = slice(0, b) if self.rows is None else self.rows
        return k_buf[rows, :self.read_len].transpose(0, 1), v_buf[rows, :self.read_len].transpose(0, 1)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of slots ``src`` ``[n]`` into slots ``dst`` ``[n]``, every layer:
        a shared prompt's prefill forked to its other samples, or a live slot moved into a retired one's hole."""
        for k_buf, v_buf in self.key_value_memory_dict.values():
            k_buf[dst, :length] = k_buf[src, :length]
            v_buf[dst, :length] = v_buf[src, :length]


class SlotCachedSelfAttention(SelfAttention):
    """megatron's ``SelfAttention``; with a ``SlotKVCache`` it caches rotated keys at per-token positions.

    ``yarn``: the model's YaRN RoPE, used by this layer when it is a full-attention one (not a sliding-window
    layer): the model's ``[L, 1, 1, d]`` table is swapped for this layer's own of the same length, and q and k
    ``[s, b, heads/tp, d]`` are multiplied by its attention factor before rotation (rotation is linear, so
    this is the factor on cos and sin), on every path: training, plain forwards and the slot cache, whose
    keys are stored rotated with this layer's table and factor.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, yarn: YarnRope | None = None, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        sliding = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.own_rope = None if sliding else yarn
        self._own_table: torch.Tensor | None = None

    def own_rope_table(self, like: torch.Tensor) -> torch.Tensor:
        """This layer's angles, as long as the model's table ``like`` and on its device (built once per length)."""
        table = self._own_table
        if table is None or table.size(0) != like.size(0) or table.device != like.device:
            table = self._own_table = self.own_rope.angles(like.size(0), like.device)
        return table

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if self.own_rope is not None and rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple) or self.pg_collection.cp.size() > 1:
                raise ValueError("YaRN full-attention layers take megatron's single RoPE table, without context parallelism")
            rotary_pos_emb = self.own_rope_table(rotary_pos_emb)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        if self.own_rope is None or self.own_rope.attention_scaling == 1.0:
            return qkv
        if not split_qkv:
            raise ValueError("YaRN full-attention layers need q and k split before RoPE (apply_rope_fusion off)")
        scale = self.own_rope.attention_scaling
        return (qkv[0] * scale, qkv[1] * scale, *qkv[2:])

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        if not isinstance(inference_context, SlotKVCache):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, sequence_len_offset, inference_params=inference_params)
        ctx = inference_context
        q_freqs = None
        if rotary_pos_emb is not None:
            q_table, k_table = rotary_pos_emb
            key = ctx.rotate(key, k_table, self.config, self.pg_collection.cp)
            q_freqs = ctx.freqs(q_table)
        key, value = ctx.store(self.layer_number, key, value)
        # Keys are rotated already: only the queries get an embedding (megatron skips a None key embedding).
        return query, key, value, (q_freqs, None), AttnMaskType.arbitrary, None


def outside_window_of_prefix(masked: torch.Tensor, window: int) -> torch.Tensor:
    """Keys out of reach of a ``window`` for a prefix mask ``[..., L]`` (True = masked; row visible up to its
    position p): key j is out when ``j <= p - window``, i.e. when key ``j + window`` is visible."""
    visible_later = ~masked[..., window:]
    return torch.nn.functional.pad(visible_later, (0, min(window, masked.size(-1))), value=False)


def sliding_causal_mask(queries: int, keys: int, window: int, device) -> torch.Tensor:
    """``[queries, keys]`` (True = masked): the last ``queries`` of ``keys`` positions, each seeing itself and
    the ``window - 1`` positions before it."""
    offset = keys - queries
    q = torch.arange(queries, device=device).unsqueeze(1) + offset
    k = torch.arange(keys, device=device).unsqueeze(0)
    return (k > q) | (k <= q - window)


class GroupedSlotAttention(DotProductAttention):
    """megatron's local core attention; on the slot cache's path (``AttnMaskType.arbitrary`` with a mask), and
    on sliding-window layers, it is torch's fused ``scaled_dot_product_attention``, grouped query heads
    reading their shared (cached) head.

    ``query`` ``[s, b, g*r, d]``, ``key`` / ``value`` ``[L, b, g, d]`` (this TP rank's heads), ``attention_mask``
    ``[b, 1, s, L]`` (True = masked) -> ``[s, b, g*r*d]``. Query head h reads KV head ``h // r``, as megatron's
    repeat does; the scale is megatron's (``softmax_scale`` times the softmax's layer-scaling coefficient).
    ``window``: this layer's sliding window in tokens (None: full attention).
    """

    def __init__(self, config, layer_number, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        sliding = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window = config.window_size[0] + 1 if sliding else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        slot_path = attn_mask_type is AttnMaskType.arbitrary and attention_mask is not None
        if not (slot_path or self.window) or self.softmax_offset is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("sliding-window attention on the local spec takes no packed sequences or bias")
        masked = attention_mask
        if slot_path and self.window:
            masked = masked | outside_window_of_prefix(masked, self.window)
        elif not slot_path:  # a plain forward: causal over the fed tokens, within the window
            masked = sliding_causal_mask(query.size(0), key.size(0), self.window, query.device)
            if attention_mask is not None:
                masked = masked | attention_mask
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        return grouped_attention(query, key, value, ~masked, scale)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """torch's fused attention with grouped query heads: ``query`` ``[s, b, g*r, d]``, ``key`` / ``value``
    ``[L, b, g, d]``, ``visible`` ``[b, 1, s, L]`` (True = attended; None: causal, ``L == s``) -> ``[s, b, g*r*d]``."""
    s, b, heads, d = query.shape
    context = torch.nn.functional.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
        attn_mask=visible, is_causal=visible is None, scale=scale, enable_gqa=True)  # [b, g*r, s, d]
    return context.permute(2, 0, 1, 3).reshape(s, b, heads * d)
