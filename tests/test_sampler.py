"""Checks ``rollout/sampler.py``: batched KV-cache generation from a tiny megatron-core GPTModel.

References:
- greedy decoding is compared with a naive loop that re-runs the FULL sequence through the model at every
  step (no KV cache, one prompt at a time) and takes the argmax of the last position's logits over the real
  vocabulary; prompts of lengths 1..7 share one batch, and EOS stopping is checked against the same loop;
- ``logprobs`` are compared with ``log_softmax`` (over the real vocabulary) of those full-forward logits;
- ``filter_logits`` is checked on hand-computed top-k / top-p cases;
- padded vocabulary rows are made to dominate the raw logits, which must still never be emitted.
"""
from __future__ import annotations

import math

import pytest
import torch

from caopd_megatron.rollout.sampler import SamplingParams, filter_logits, generate
from helpers_models import REAL_VOCAB, full_logits, runtime, tiny_model  # noqa: F401  (runtime is a fixture)

NEG_INF = float("-inf")
# Prompts of lengths 1..7 (deliberately not sorted by length) over real token ids.
PROMPTS = [
    [7, 3, 9, 12],
    [5],
    [30, 31, 4, 8, 8, 21, 17],
    [11, 2],
    [6, 6, 6, 39, 1, 22],
    [13, 14, 15],
    [25, 26, 27, 28, 29],
]
NEVER = 127  # an eos id that is never emitted: a padded vocabulary row (still a valid embedding index)


@pytest.fixture(scope="module")
def model(runtime):
    # A larger init std than the default 0.02 spreads the logits, so greedy argmaxes have clear margins and
    # the KV-cache vs full-forward comparison cannot flip on a float near-tie.
    m, vocab = tiny_model(seed=11, init_method_std=0.2)
    assert vocab.real == REAL_VOCAB and vocab.padded == 128
    m.eval()
    return m


@torch.no_grad()
def naive_greedy(model, prompt, max_new_tokens, eos_id):
    """Reference: full forward of the whole sequence per step, argmax over the real vocabulary."""
    seq, resp, lps = list(prompt), [], []
    for _ in range(max_new_tokens):
        logits = full_logits(model, seq)[-1, :REAL_VOCAB].double()
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) > 1e-4, "reference has a near-tie; pick another seed"
        nxt = int(torch.argmax(logits))
        resp.append(nxt)
        lps.append(float(torch.log_softmax(logits, dim=-1)[nxt]))
        seq.append(nxt)
        if nxt == eos_id:
            return resp, lps, True
    return resp, lps, False


@torch.no_grad()
def reference_logprobs(model, prompt, response):
    """log_softmax over the real vocabulary of full-forward logits, at each emitted response token."""
    logits = full_logits(model, list(prompt) + list(response))[:, :REAL_VOCAB].double()
    logp = torch.log_softmax(logits, dim=-1)
    n = len(prompt)
    return [float(logp[n - 1 + j, t]) for j, t in enumerate(response)]


def test_greedy_matches_full_forward_reference_for_mixed_prompt_lengths(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    gens = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    assert len(gens) == len(PROMPTS)
    for prompt, g in zip(PROMPTS, gens):
        ref, ref_lps, ref_finished = naive_greedy(model, prompt, 6, NEVER)
        assert g.prompt_ids == prompt  # order preserved despite the length sort inside generate
        assert g.response_ids == ref
        assert g.finished is ref_finished is False
        assert len(g.logprobs) == len(g.response_ids)
        assert g.logprobs == pytest.approx(ref_lps, abs=1e-4)
    # The comparison is only meaningful if the model does not emit one constant token everywhere.
    assert len({t for g in gens for t in g.response_ids}) > 3


def test_greedy_eos_stopping_matches_reference(model):
    max_new = 6
    no_eos = [naive_greedy(model, p, max_new, NEVER)[0] for p in PROMPTS]
    # Pick as EOS a token that the model emits in some rows mid-response but not in all rows, so that some
    # rows stop early and others run to max_new_tokens.
    eos_id = None
    for cand in sorted({t for r in no_eos for t in r}):
        stops_early = [cand in r[:-1] for r in no_eos]
        if any(stops_early) and not all(cand in r for r in no_eos):
            eos_id = cand
            break
    assert eos_id is not None

    gens = generate(model, PROMPTS, SamplingParams(max_new_tokens=max_new, temperature=0.0), eos_id=eos_id,
                    real_vocab_size=REAL_VOCAB)
    finished = []
    for prompt, g in zip(PROMPTS, gens):
        ref, ref_lps, ref_finished = naive_greedy(model, prompt, max_new, eos_id)
        assert g.response_ids == ref
        assert g.finished is ref_finished
        assert g.logprobs == pytest.approx(ref_lps, abs=1e-4)
        if ref_finished:
            assert g.response_ids[-1] == eos_id and g.response_ids.count(eos_id) == 1
            assert len(g.response_ids) < max_new or g.response_ids.index(eos_id) == max_new - 1
        else:
            assert len(g.response_ids) == max_new and eos_id not in g.response_ids
        finished.append(g.finished)
    assert any(finished) and not all(finished)


def test_smaller_batch_size_gives_identical_greedy_results_in_order(model):
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    full = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB, batch_size=256)
    small = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB, batch_size=2)
    one = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB, batch_size=1)
    for a, b, c, p in zip(full, small, one, PROMPTS):
        assert a.prompt_ids == b.prompt_ids == c.prompt_ids == p
        assert a.response_ids == b.response_ids == c.response_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.logprobs == pytest.approx(c.logprobs, abs=1e-5)


def test_sampling_is_reproducible_per_seed_and_logprobs_match_reference(model):
    def run(seed):
        params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed)
        return generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)

    a, b, c = run(7), run(7), run(8)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0), eos_id=NEVER,
                      real_vocab_size=REAL_VOCAB)
    assert [g.response_ids for g in a] != [g.response_ids for g in greedy]  # really sampled
    for g in a:
        assert all(0 <= t < REAL_VOCAB for t in g.response_ids)
        # Logprobs are the model's temperature-1 log-probabilities of the sampled tokens; the reference
        # teacher-forces the sampled response through a full forward.
        assert g.logprobs == pytest.approx(reference_logprobs(model, g.prompt_ids, g.response_ids), abs=1e-4)


def test_samples_do_not_depend_on_batching_or_order(model):
    """Counter-based noise: a prompt's sample depends on (seed, its sequence id, position) only, so batch size,
    the prompts' order and which other prompts share the call change nothing (what lets data-parallel
    replicas split a rollout)."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=21)
    full = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB, batch_size=256)
    for batch_size in (1, 3):
        other = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB, batch_size=batch_size)
        assert [g.response_ids for g in other] == [g.response_ids for g in full]
    order = [4, 0, 6]
    subset = generate(model, [PROMPTS[i] for i in order], params, eos_id=NEVER, real_vocab_size=REAL_VOCAB,
                      seq_ids=order)
    assert [g.response_ids for g in subset] == [full[i].response_ids for i in order]
    # Another sequence id is another draw: the same prompt repeated gives different samples.
    repeated = generate(model, [PROMPTS[2]] * 6, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    assert len({tuple(g.response_ids) for g in repeated}) > 1
    with pytest.raises(ValueError, match="seq_ids has 2 entries for 3 prompts"):
        generate(model, PROMPTS[:3], params, eos_id=NEVER, real_vocab_size=REAL_VOCAB, seq_ids=[0, 1])


def test_logprobs_ignore_temperature_and_truncation(model):
    params = SamplingParams(max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    gens = generate(model, PROMPTS, params, eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    for g in gens:
        assert g.logprobs == pytest.approx(reference_logprobs(model, g.prompt_ids, g.response_ids), abs=1e-4)


def test_top_k_one_sampling_equals_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0), eos_id=NEVER,
                      real_vocab_size=REAL_VOCAB)
    topk1 = generate(model, PROMPTS, SamplingParams(max_new_tokens=5, temperature=1.3, top_k=1, seed=5),
                     eos_id=NEVER, real_vocab_size=REAL_VOCAB)
    assert [g.response_ids for g in topk1] == [g.response_ids for g in greedy]


def test_padded_vocabulary_is_never_emitted(runtime):
    m, vocab = tiny_model(seed=4, init_method_std=0.2)
    m.eval()
    with torch.no_grad():
        w = m.output_layer.weight
        n_pad = vocab.padded - vocab.real
        dirs = torch.randn(n_pad // 2, w.size(1), generator=torch.Generator().manual_seed(0))
        # +u and -u rows: for any hidden state h, one of them scores 100 * |h.u|, far above every real logit.
        w[vocab.real:vocab.real + 2 * dirs.size(0)] = 100.0 * torch.cat([dirs, -dirs])
        # Sanity: without masking, the padded rows win everywhere (so this test can fail).
        raw = full_logits(m, PROMPTS[2] + [1, 2, 3])
        assert bool((raw.argmax(-1) >= vocab.real).all())
    for params in (SamplingParams(max_new_tokens=6, temperature=0.0),
                   SamplingParams(max_new_tokens=6, temperature=1.0, seed=1),
                   SamplingParams(max_new_tokens=6, temperature=5.0, top_p=0.99, seed=2)):
        gens = generate(m, PROMPTS, params, eos_id=NEVER, real_vocab_size=vocab.real)
        assert all(0 <= t < vocab.real for g in gens for t in g.response_ids)
        assert all(math.isfinite(lp) for g in gens for lp in g.logprobs)
    # Greedy still equals the real-vocabulary argmax reference.
    gens = generate(m, PROMPTS[:3], SamplingParams(max_new_tokens=4, temperature=0.0), eos_id=NEVER,
                    real_vocab_size=vocab.real)
    for p, g in zip(PROMPTS[:3], gens):
        assert g.response_ids == naive_greedy(m, p, 4, NEVER)[0]


def test_generate_restores_training_mode_and_handles_edge_inputs(model):
    model.train()
    try:
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=1, temperature=0.0), eos_id=NEVER,
                 real_vocab_size=REAL_VOCAB)
        assert model.training
    finally:
        model.eval()
    assert generate(model, [], SamplingParams(), eos_id=2, real_vocab_size=REAL_VOCAB) == []
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], SamplingParams(temperature=0.0), eos_id=2, real_vocab_size=REAL_VOCAB)


# ---------------------------------------------------------------- filter_logits (hand-computed cases)
def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, -1.0, 5.0, 6.0]])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.equal(out, torch.tensor([[NEG_INF, 3.0, 2.0, NEG_INF], [NEG_INF, NEG_INF, 5.0, 6.0]]))
    assert torch.equal(logits, torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, -1.0, 5.0, 6.0]]))  # input untouched
    # top_k = 0 or >= V: no filtering.
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)
    assert torch.equal(filter_logits(logits, 4, 1.0), logits)
    # Ties with the k-th value are kept.
    tied = filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1, top_p=1.0)
    assert torch.equal(tied, torch.tensor([[NEG_INF, 2.0, 2.0, NEG_INF]]))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled order
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().unsqueeze(0)
    kept = lambda out: (out[0] > NEG_INF).tolist()  # noqa: E731
    # mass before each sorted token: 0, 0.5, 0.8, 0.95 -> dropped where it already reaches top_p
    assert kept(filter_logits(logits, 0, 0.75)) == [False, True, False, True]
    assert kept(filter_logits(logits, 0, 0.85)) == [True, True, False, True]
    assert kept(filter_logits(logits, 0, 0.4)) == [False, True, False, False]
    assert kept(filter_logits(logits, 0, 1e-6)) == [False, True, False, False]  # the top token always survives
    assert kept(filter_logits(logits, 0, 0.97)) == [True, True, True, True]
    out = filter_logits(logits, 0, 0.75)
    assert out[0, 1] == logits[0, 1] and out[0, 3] == logits[0, 3]  # kept values unchanged


def test_top_p_is_applied_per_row():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]).log()
    out = filter_logits(logits, 0, 0.6)
    assert (out[0] > NEG_INF).tolist() == [True, True, False, False]
    assert (out[1] > NEG_INF).tolist().count(True) == 3  # 0, .25, .5 < .6 -> three of four uniform tokens


def test_top_k_then_top_p_renormalises_after_top_k():
    # After top-k=3 the kept probabilities are 0.5/0.95, 0.3/0.95, 0.15/0.95 = .526, .316, .158; the mass
    # before the third is .842 >= .84, so it is dropped (it would be kept without renormalisation: .8 < .84).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert (filter_logits(logits, 0, 0.84)[0] > NEG_INF).tolist() == [True, True, True, False]
    assert (filter_logits(logits, 3, 0.84)[0] > NEG_INF).tolist() == [True, True, False, False]


# ---------------------------------------------------------------- SamplingParams validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_invalid_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_valid_sampling_params_edges():
    SamplingParams(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    SamplingParams(top_p=1e-9, top_k=1)
