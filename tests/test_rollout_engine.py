"""Checks the rollout engine (``rollout/continuous.py`` on ``models/kv_cache_attention.py``) against independent
references and against what the sampler of before it produced.

References:
- ``tests/assets/sampler_reference.json``: the generations of the sampler before the engine (no shared
  prefill, no retirement, keys re-rotated each step) on five fixed cases (``tests/sampler_cases.py``):
  token ids and ``finished`` must be equal, log-probabilities equal to float rounding;
- ``rollout.reference.generate_without_cache``: one sequence at a time, a full forward of the whole
  sequence per token, no cache: the same samples, at every slot count (1 slot ... all sequences at once);
- the model's forward after weights change in place (an optimizer step): the rollout's log-probabilities
  are those of the current weights, not of a stale copy;
- the work done, counted at the model's entry: prefill forwards (one per admission, one row per distinct
  prompt), decode rows (no row fed past its end), RoPE applied to fed tokens only.
"""
from __future__ import annotations

import json

import pytest
import torch

import caopd_megatron.models.kv_cache_attention as kv_cache
import caopd_megatron.models.slot_forward as slot_forward
from caopd_megatron.rollout.continuous import SlotDecoder
from caopd_megatron.rollout.reference import decision_margin, full_forward_logits, generate_without_cache
from caopd_megatron.rollout.sampler import SamplingParams, generate
from helpers_models import REAL_VOCAB, runtime, tiny_model  # noqa: F401  (runtime is a fixture)
from sampler_cases import ASSET, CASES, NEVER, case_prompts, run_case


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_samples_equal_the_pre_engine_sampler(runtime, case):  # noqa: F811
    recorded = json.loads(ASSET.read_text())[case[0]]
    got = run_case(case, generate)
    assert [g["response_ids"] for g in got] == [g["response_ids"] for g in recorded]
    assert [g["finished"] for g in got] == [g["finished"] for g in recorded]
    for g, r in zip(got, recorded):
        assert g["logprobs"] == pytest.approx(r["logprobs"], abs=1e-5)


@pytest.fixture(scope="module")
def model(runtime):  # noqa: F811
    m, _ = tiny_model(seed=11, init_method_std=0.2)
    return m.eval()


def _mixed_prompts() -> list[list[int]]:
    """Four distinct prompts of lengths 1..9, each sampled three times (K = 3), plus two singletons."""
    distinct = case_prompts(4, 4, (1, 9), 3, REAL_VOCAB)
    return distinct + [[5, 6, 7], [9]]


@pytest.mark.parametrize("slots", [1, 2, 4, 5, 256])
def test_samples_equal_the_no_cache_reference_at_every_slot_count(model, slots):
    """Fewer slots than sequences exercises retirement and refill; 256 decodes everything at once."""
    prompts = _mixed_prompts()
    params = SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=4)
    eos = 29  # emitted early by some rows (checked below), so rows retire at different steps
    ref = generate_without_cache(model, prompts, params, eos_id=eos, real_vocab_size=REAL_VOCAB)
    got = generate(model, prompts, params, eos_id=eos, real_vocab_size=REAL_VOCAB, batch_size=slots)
    assert 0 < sum(g.finished for g in ref) < len(ref)
    for r, g, p in zip(ref, got, prompts):
        assert g.prompt_ids == p
        assert g.response_ids == r.response_ids and g.finished == r.finished
        assert g.logprobs == pytest.approx(r.logprobs, abs=1e-5)
    # No sample was decided by a float near-tie (so equality is a real check, not luck).
    for i, r in enumerate(ref):
        for j in range(len(r.response_ids)):
            seq = prompts[i] + r.response_ids[:j]
            with torch.no_grad():
                margin = decision_margin(full_forward_logits(model, seq), params, REAL_VOCAB, i, len(seq))
            assert margin > 1e-3


class _Recorder:
    """Records the shapes the decoder feeds the model (prefill: ``rows`` given; decode: live slots)."""

    def __init__(self, monkeypatch):
        self.prefills, self.decodes = [], []
        original = SlotDecoder._logits

        def logits(decoder, tokens, write_pos, read_len, rows=None):
            (self.prefills if rows is not None else self.decodes).append(tuple(tokens.shape))
            return original(decoder, tokens, write_pos, read_len, rows)

        monkeypatch.setattr(SlotDecoder, "_logits", logits)


def test_shared_prompts_are_prefilled_once_in_one_padded_forward(model, monkeypatch):
    rec = _Recorder(monkeypatch)
    prompts = _mixed_prompts()
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=2)
    got = generate(model, prompts, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    width = max(len(p) for p in prompts)
    assert rec.prefills == [(6, width)]  # 6 distinct prompts of mixed lengths: one forward, one row each
    assert rec.decodes == [(len(prompts), 1)] * 2
    # The three samples of a prompt share its prefill and still draw their own tokens.
    assert len({tuple(g.response_ids) for g in got[:3]}) > 1


def test_finished_rows_leave_and_waiting_sequences_take_their_slots(model, monkeypatch):
    rec = _Recorder(monkeypatch)
    prompts = _mixed_prompts()
    params = SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.9, seed=4)
    got = generate(model, prompts, params, eos_id=29, real_vocab_size=REAL_VOCAB, batch_size=4)
    # Every decode row feeds a sampled token that is not its last: nobody decodes past its end.
    assert sum(b for b, _ in rec.decodes) == sum(len(g.response_ids) - 1 for g in got)
    assert max(b for b, _ in rec.decodes) == 4 and len(rec.prefills) > 1  # refilled from the queue
    # The slots stay full while work waits: the first decode steps run 4 rows until the queue is empty.
    assert rec.decodes[0] == (4, 1)


@pytest.mark.parametrize("path", ["megatron", "lean"])
def test_keys_are_rotated_once_when_they_enter_the_cache(model, monkeypatch, path):
    """megatron's static path rotates the whole cached K (``[t, b, ...]``) at every step; here RoPE only ever
    sees the tokens the forward feeds: on megatron's forward (kept for models the lean one does not copy) and
    on the lean forward, which rotates a group's query and key heads in one call."""
    fed, rotated = [], []
    rope = kv_cache.apply_rotary_pos_emb
    monkeypatch.setattr(kv_cache, "apply_rotary_pos_emb", lambda t, *a, **k: rotated.append(t.size(0)) or rope(t, *a, **k))
    import megatron.core.transformer.attention as attention

    q_rope = attention.apply_rotary_pos_emb
    monkeypatch.setattr(attention, "apply_rotary_pos_emb", lambda t, *a, **k: rotated.append(t.size(0)) or q_rope(t, *a, **k))
    lean_rope, heads = slot_forward.rotate, []
    monkeypatch.setattr(slot_forward, "rotate", lambda t, *a: rotated.append(t.size(0)) or heads.append(t.shape[2:4])
                        or lean_rope(t, *a))
    if path == "megatron":
        monkeypatch.setattr(slot_forward, "refusal", lambda m: "forced off")
    original = SlotDecoder._logits
    monkeypatch.setattr(SlotDecoder, "_logits", lambda d, tokens, *a, **k: fed.append(tokens.size(1)) or original(d, tokens, *a, **k))
    generate(model, [[1, 2, 3, 4, 5, 6]] * 2, SamplingParams(max_new_tokens=6, temperature=0.0), eos_id=NEVER,
             real_vocab_size=REAL_VOCAB)
    layers = 2
    assert fed == [6] + [1] * 5
    # Per forward and layer: the new keys once, the queries once (together on the lean path); each as long as
    # the fed tokens.
    assert rotated == [n for n in fed for _ in range((2 if path == "megatron" else 1) * layers)]
    cfg = model.config
    groups = cfg.num_query_groups or cfg.num_attention_heads
    assert heads == ([] if path == "megatron" else [(groups, cfg.num_attention_heads // groups + 1)] * len(rotated))


def test_rollout_uses_the_current_weights_and_its_logprobs_match_a_recomputed_forward(runtime):  # noqa: F811
    """An optimizer step changes the weights in place; the next rollout must sample from (and report the
    log-probabilities of) the updated model, not of a copy kept from before."""
    m, _ = tiny_model(seed=5, init_method_std=0.2)
    before, _ = tiny_model(seed=5, init_method_std=0.2)  # a copy of the weights before the step
    before.eval()
    prompts = [[3, 9, 4], [3, 9, 4], [12, 1]]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3)
    generate(m, prompts, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    loss = m(torch.tensor([[3, 9, 4, 7]]), torch.arange(4).unsqueeze(0), attention_mask=None).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    m.eval()
    got = generate(m, prompts, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    stale = generate(before, prompts, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    assert [g.response_ids for g in got] != [g.response_ids for g in stale]
    for g in got:
        with torch.no_grad():
            recomputed = [float(torch.log_softmax(full_forward_logits(m, g.prompt_ids + g.response_ids[:j])[:REAL_VOCAB]
                                                  .double(), -1)[t]) for j, t in enumerate(g.response_ids)]
        assert g.logprobs == pytest.approx(recomputed, abs=1e-4)


def test_a_model_without_the_rollout_attention_is_refused(model, monkeypatch):
    """megatron's plain SelfAttention would read a slot cache as a single-offset static cache (wrong, silently)."""
    from megatron.core.transformer.attention import SelfAttention

    layer = model.decoder.layers[0].self_attention
    monkeypatch.setattr(layer, "__class__", SelfAttention)
    with pytest.raises(TypeError, match="not SlotCachedSelfAttention: build it with caopd_megatron.models.builder"):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=1, temperature=0.0), eos_id=NEVER,
                 real_vocab_size=REAL_VOCAB)
