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


def _plans():
    """(tokens [b, s], write positions [b, s], read length, fed slots or None) per forward: a prefill of three
    prompts (lengths 5, 2, 4, left-padded; trash position 12) into slots 2, 0, 3, then three decode steps of
    slots 0..3 (slot 1 started empty at position 0)."""
    trash = 12
    tokens = torch.tensor([[5, 9, 3, 7, 1], [0, 0, 0, 8, 2], [0, 6, 6, 4, 30]])
    write = torch.tensor([[0, 1, 2, 3, 4], [trash] * 3 + [0, 1], [trash, 0, 1, 2, 3]])
    plans = [(tokens, write, 5, torch.tensor([2, 0, 3]))]
    lengths = torch.tensor([2, 0, 5, 4])
    for step in range(3):
        plans.append((torch.tensor([[11 + step], [3], [17], [25 - step]]), lengths.unsqueeze(1).clone(),
                      int(lengths.max()) + 1, None))
        lengths = lengths + 1
    return plans


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.inference_mode()
def test_lean_logits_and_cache_equal_megatrons_bitwise(runtime, variant):  # noqa: F811
    model = _model(runtime, **VARIANTS[variant])
    assert slot_forward.refusal(model) is None
    lean = slot_forward.SlotForward(model)
    ours, theirs = SlotKVCache(4, 12), SlotKVCache(4, 12)
    for tokens, write, read_len, rows in _plans():
        mask = ours.plan(write, read_len, rows)
        got = lean.logits(tokens, ours, mask)
        mask = theirs.plan(write, read_len, rows)
        want = model(tokens, write, attention_mask=mask, inference_context=theirs, runtime_gather_output=True)[:, -1]
        assert got.shape == want.shape and torch.equal(got, want)
    assert ours.key_value_memory_dict.keys() == theirs.key_value_memory_dict.keys()
    for layer, (k, v) in ours.key_value_memory_dict.items():
        k_ref, v_ref = theirs.key_value_memory_dict[layer]
        assert torch.equal(k[:, :12], k_ref[:, :12]) and torch.equal(v[:, :12], v_ref[:, :12])  # trash aside


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
