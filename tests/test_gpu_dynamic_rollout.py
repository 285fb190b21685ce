"""megatron-core's dynamic engine behind ``generate(engine="dynamic")`` on CUDA (marker ``gpu``).

References:
- distribution: 4000 samples of one prompt's first token (sequence ids 0..3999) against the softmax of the
  model's full-forward logits for that prompt, Pearson's chi-square over the real vocabulary (bins of
  expected count < 5 pooled); the p-value must exceed 1e-3, and fall below it against the softmax at
  temperature 0.7 (the test has the power to see a wrong distribution);
- the static engine on the same bf16 weights: the keyed draws make the samples equal up to float rounding of
  the logits (flash-attn vs torch attention), so every sequence matches until a draw whose static decision
  margin is small (a near-tie rounding may flip), and log-probabilities of the matching tokens agree to bf16
  rounding.
With ``CAOPD_GPU_TESTS_ON_CPU=1`` on a CPU the dynamic engine cannot run: the distribution test runs on the
static engine instead (the same statistic, the code path of the test itself); the comparison is skipped.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from caopd_megatron.rollout.dynamic import FLASH_ATTENTION_MODULES, dynamic_engine_blocker
from caopd_megatron.rollout.reference import decision_margin, full_forward_logits
from caopd_megatron.rollout.sampler import SamplingParams, generate
from helpers_models import REAL_VOCAB, tiny_model

pytestmark = pytest.mark.gpu
NEVER = 127
BLOCKER = dynamic_engine_blocker(torch.cuda.is_available(),
                                 any(importlib.util.find_spec(m) is not None for m in FLASH_ATTENTION_MODULES))


@pytest.fixture(scope="module")
def model():
    if torch.cuda.is_available() and BLOCKER:
        pytest.skip(f"the dynamic engine cannot run here: {BLOCKER}")
    m, _ = tiny_model(seed=11, init_method_std=0.2, params_dtype="bfloat16" if torch.cuda.is_available() else "float32")
    return m.eval()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` ``[V]`` against ``probs`` ``[V]`` (bins expecting < 5 pooled)."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def test_sampled_frequencies_match_the_softmax(model):
    engine = "dynamic" if torch.cuda.is_available() else "static"
    prompt, n = [5, 9, 14, 3], 4000
    gens = generate(model, [prompt] * n, SamplingParams(max_new_tokens=1, temperature=1.0, seed=1), eos_id=NEVER,
                    real_vocab_size=REAL_VOCAB, batch_size=512, engine=engine)
    with torch.no_grad():
        logits = full_forward_logits(model, prompt)[:REAL_VOCAB].double().cpu()
    probs = torch.softmax(logits, -1)
    counts = torch.bincount(torch.tensor([g.response_ids[0] for g in gens]), minlength=REAL_VOCAB)[:REAL_VOCAB]
    assert chi_square_p_value(counts, probs) > 1e-3
    assert chi_square_p_value(counts, torch.softmax(logits / 0.7, -1)) < 1e-3  # the test tells temperatures apart
    # The recorded log-probabilities are the model's (temperature 1, real vocabulary).
    lps = {g.response_ids[0]: g.logprobs[0] for g in gens}
    for token, lp in lps.items():
        assert lp == pytest.approx(float(probs[token].log()), abs=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the dynamic engine needs CUDA")
def test_dynamic_samples_equal_static_samples_up_to_rounding(model):
    prompts = [[5, 6, 7]] * 4 + [[9], [12, 1, 30, 4, 8, 22, 17], [3, 3]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    static = generate(model, prompts, params, eos_id=29, real_vocab_size=REAL_VOCAB, engine="static")
    dynamic = generate(model, prompts, params, eos_id=29, real_vocab_size=REAL_VOCAB, engine="dynamic")
    for i, (s, d) in enumerate(zip(static, dynamic)):
        same = 0
        while same < min(len(s.response_ids), len(d.response_ids)) and s.response_ids[same] == d.response_ids[same]:
            same += 1
        if (s.response_ids, s.finished) != (d.response_ids, d.finished):
            seq = prompts[i] + s.response_ids[:same]
            with torch.no_grad():
                margin = decision_margin(full_forward_logits(model, seq), params, REAL_VOCAB, i, len(seq))
            assert margin < 0.1, f"sequence {i} differs at token {same} with a clear static margin {margin}"
        assert d.logprobs[:same] == pytest.approx(s.logprobs[:same], abs=3e-2)
