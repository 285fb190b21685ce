"""The lean rollout forward (``models/slot_forward.py``) against megatron-core's own forward on the slot cache.

Reference: the same GPTModel called as megatron runs it (``model(tokens, positions, attention_mask=...,
inference_context=...)``, every TransformerLayer / attention / parallel-linear wrapper) on a second cache fed
the same plans. Logits and every cached key and value must be equal bit for bit, for a mixed-length
left-padded prefill into chosen slots followed by decode steps, on the model variants the builder makes
(GQA, QKV bias, QK norm, tied embeddings, Llama-3 RoPE scaling). End to end, ``generate`` must give the
same tokens and log-probabilities, bit for bit, with the lean forward as with megatron's.
"""
from __future__ import annotations

import pytest
import torch

import caopd_megatron.models.slot_forward as slot_forward
from caopd_megatron.models.kv_cache_attention import SlotKVCache
from caopd_megatron.rollout.sampler import SamplingParams, generate
from helpers_models import REAL_VOCAB, runtime, tiny_model  # noqa: F401  (runtime is a fixture)

VARIANTS = {
    "gqa": dict(),
    "qkv_bias_qk_norm_tied": dict(add_qkv_bias=True, qk_layernorm=True, tie_embeddings=True),
    "mha_rope_scaling": dict(num_query_groups=None, rope_scaling=True, num_layers=3),
}


def _model(runtime, **overrides):  # noqa: F811
    model, _ = tiny_model(seed=7, init_method_std=0.3, **overrides)
    with torch.no_grad():  # non-zero biases and norm weights, so each term is exercised
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _plans(kind: str = "padded"):
    """(tokens [b, s], write positions [b, s], read length, fed slots or None) per forward, then three decode
    steps of slots 0..3. ``padded``: a prefill of three prompts (lengths 5, 2, 4, left-padded; trash position 12)
    into slots 2, 0, 3 (slot 1 starts empty at position 0). ``fresh``: four 5-token prompts into slots 0..3, no
    padding, nothing cached before (the causal-kernel prefill)."""
    trash = 12
    if kind == "fresh":
        tokens = torch.tensor([[5, 9, 3, 7, 1], [8, 2, 2, 8, 0], [6, 6, 4, 30, 1], [3, 1, 4, 1, 5]])
        plans, lengths = [(tokens, torch.arange(5).expand(4, 5), 5, None)], torch.full((4,), 5)
    else:
        tokens = torch.tensor([[5, 9, 3, 7, 1], [0, 0, 0, 8, 2], [0, 6, 6, 4, 30]])
        write = torch.tensor([[0, 1, 2, 3, 4], [trash] * 3 + [0, 1], [trash, 0, 1, 2, 3]])
        plans, lengths = [(tokens, write, 5, torch.tensor([2, 0, 3]))], torch.tensor([2, 0, 5, 4])
    for step in range(3):
        plans.append((torch.tensor([[11 + step], [3], [17], [25 - step]]), lengths.unsqueeze(1).clone(),
                      int(lengths.max()) + 1, None))
        lengths = lengths + 1
    return plans


@pytest.mark.parametrize("prefill", ["padded", "fresh"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.inference_mode()
def test_lean_logits_and_cache_equal_megatrons_bitwise(runtime, variant, prefill, monkeypatch):  # noqa: F811
    """The lean path (RoPE factors once per forward, q and k rotated together, the causal kernel for a fresh
    prefill) against megatron's forward, which rotates per tensor and attends under the explicit mask."""
    model = _model(runtime, **VARIANTS[variant])
    assert slot_forward.refusal(model) is None
    lean = slot_forward.SlotForward(model)
    ours, theirs = SlotKVCache(4, 12), SlotKVCache(4, 12)
    kernels = []
    original = slot_forward.grouped_attention
    monkeypatch.setattr(slot_forward, "grouped_attention",
                        lambda q, k, v, visible, scale: kernels.append(visible is None) or original(q, k, v, visible, scale))
    for step, (tokens, write, read_len, rows) in enumerate(_plans(prefill)):
        mask = ours.plan(write, read_len, rows)
        assert ours.causal == (prefill == "fresh" and step == 0)
        got = lean.logits(tokens, ours, mask)
        mask = theirs.plan(write, read_len, rows)
        want = model(tokens, write, attention_mask=mask, inference_context=theirs, runtime_gather_output=True)[:, -1]
        assert got.shape == want.shape and torch.equal(got, want)
    assert ours.key_value_memory_dict.keys() == theirs.key_value_memory_dict.keys()
    for layer, (k, v) in ours.key_value_memory_dict.items():
        k_ref, v_ref = theirs.key_value_memory_dict[layer]
        assert torch.equal(k[:, :12], k_ref[:, :12]) and torch.equal(v[:, :12], v_ref[:, :12])  # trash aside
    layers = len(lean.layers)
    assert kernels == [prefill == "fresh"] * layers + [False] * 3 * layers  # causal kernel: the fresh prefill only


def test_rotate_is_megatrons_rope_bit_for_bit(runtime):  # noqa: F811
    """``rotate`` with ``rope_factors`` (one call on a group's q and k heads) against megatron's
    ``apply_rotary_pos_emb`` on each tensor, at angles up to 4k positions (large arguments round differently)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    model = _model(runtime)
    gen = torch.Generator().manual_seed(0)
    table = model.rotary_pos_emb(4096)  # [L, 1, 1, d]
    positions = torch.randint(0, 4096, (6, 3), generator=gen)  # [s, b]
    freqs = table[positions.reshape(-1)].view(6, 3, 1, table.size(-1))
    qk = torch.randn(6, 3, 2, 3, table.size(-1), generator=gen) * 5  # [s, b, groups, r + 1, d]
    cos, signed_sin = slot_forward.rope_factors(freqs, qk.dtype)
    got = slot_forward.rotate(qk, cos.unsqueeze(3), signed_sin.unsqueeze(3))
    cfg = model.config
    want_q = apply_rotary_pos_emb(qk[:, :, :, :2].reshape(6, 3, 4, -1), freqs, config=cfg)
    want_k = apply_rotary_pos_emb(qk[:, :, :, 2], freqs, config=cfg)
    assert torch.equal(got[:, :, :, :2].reshape(6, 3, 4, -1), want_q) and torch.equal(got[:, :, :, 2], want_k)
    assert not torch.equal(slot_forward.rotate(qk, cos.unsqueeze(3), torch.sin(freqs).unsqueeze(3)), got)


def test_only_a_fresh_unpadded_prefill_is_causal():
    """``SlotKVCache.causal`` (the lean path's causal-kernel switch): every row at positions 0..s-1 and nothing
    else read; a padded row, a row starting mid-cache or a longer read keeps the explicit mask."""
    ctx = SlotKVCache(2, 8)
    fresh = torch.arange(4).expand(2, 4)
    ctx.plan(fresh, 4)
    assert ctx.causal
    for write, read_len in ((fresh, 5), (torch.tensor([[0, 1, 2, 3], [8, 0, 1, 2]]), 4),
                            (torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]), 4), (torch.tensor([[4], [4]]), 5)):
        ctx.plan(write, read_len)
        assert not ctx.causal


def test_generate_is_bitwise_the_same_with_and_without_the_lean_forward(runtime, monkeypatch):  # noqa: F811
    model = _model(runtime, add_qkv_bias=True)
    prompts = [[3, 9, 4, 2, 8], [3, 9, 4, 2, 8], [12, 1], [7], [20, 21, 22, 23, 24, 25, 26]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    calls = []
    original = slot_forward.SlotForward.logits
    monkeypatch.setattr(slot_forward.SlotForward, "logits", lambda *a: calls.append(1) or original(*a))
    lean = generate(model, prompts, params, eos_id=29, real_vocab_size=REAL_VOCAB, batch_size=3)
    assert calls  # the lean forward served this rollout
    monkeypatch.setattr(slot_forward, "refusal", lambda m: "forced off")
    n = len(calls)
    plain = generate(model, prompts, params, eos_id=29, real_vocab_size=REAL_VOCAB, batch_size=3)
    assert len(calls) == n  # ... and not this one
    for a, b in zip(lean, plain):
        assert a.response_ids == b.response_ids and a.logprobs == b.logprobs and a.finished == b.finished


def test_a_model_it_cannot_copy_keeps_megatrons_forward(runtime, monkeypatch):  # noqa: F811
    model = _model(runtime)
    monkeypatch.setattr(model.decoder.layers[1].mlp.linear_fc2, "bias", torch.nn.Parameter(torch.zeros(32)))
    assert slot_forward.refusal(model) == "MLP or projection is not megatron's bias-free dense one"


@pytest.mark.parametrize("switches, reason", [
    (dict(norm_placement="post"), "PostNormTransformerLayer is not megatron's pre-norm TransformerLayer"),
    (dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
     "attention is not the slot cache's full local attention"),
    (dict(qk_layernorm=True, qk_norm_scope="projection"), "attention is not the slot cache's full local attention"),
    (dict(yarn_factor=4.0, yarn_original_max_position_embeddings=8), "a layer with its own (YaRN) RoPE table"),
])
def test_olmo3_layers_keep_megatrons_forward_and_their_samples(runtime, switches, reason):  # noqa: F811
    """OLMo-3's layers (post-sublayer norms, sliding windows, whole-projection QK norm) are not copied: refused by
    name, and ``generate`` (megatron's forward then) gives the no-cache reference's greedy tokens."""
    from caopd_megatron.rollout.reference import generate_without_cache

    model, _ = tiny_model(seed=7, init_method_std=0.3, **switches)
    model.eval()
    assert slot_forward.refusal(model) == reason
    prompts, params = [[3, 9, 4, 2, 8], [12, 1]], SamplingParams(max_new_tokens=4, temperature=0.0)
    got = generate(model, prompts, params, eos_id=127, real_vocab_size=REAL_VOCAB)
    ref = generate_without_cache(model, prompts, params, eos_id=127, real_vocab_size=REAL_VOCAB)
    assert [g.response_ids for g in got] == [r.response_ids for r in ref]
