"""vOPD (sampled-token policy gradient) and the per-token diagnostics against direct torch computations.

References are fp64 ``torch.nn.functional`` computations on the full logits: the reverse-KL gradient (by
autograd through ``F.kl_div``), the per-sample policy-gradient surrogate ``-A log_softmax(s)[y]``, entropies,
the teacher's mass outside the student's top-k.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from caopd_megatron.config.schema import DistillConfig
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.losses import vocab_parallel_divergence
from caopd_megatron.distill.sampled_token import sampled_token_policy_gradient
from caopd_megatron.distill.token_diagnostics import DiagnosticsSink


def make_logits(*shape, scale=2.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def reference_vopd(student, teacher, tokens, *, baseline, top_k=3, reward_clip=None, temperature=1.0, real=None):
    """(value KL(p||q), grad of sum(-A log p(y)) w.r.t. student, advantage) in fp64, straight from F."""
    real = real or student.shape[-1]
    leaf = student.detach().double().requires_grad_()
    logp = F.log_softmax(leaf[..., :real] / temperature, -1)
    logq = F.log_softmax(teacher[..., :real].double() / temperature, -1)
    kl = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    with torch.no_grad():
        reward = (logq - logp).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if reward_clip is not None:
            reward = reward.clamp(min=reward_clip)
        if baseline == "full":
            value = -kl
        elif baseline == "top_k":
            top_logp, ids = logp.topk(top_k, dim=-1)
            renormalised = torch.softmax(top_logp, -1)
            value = (renormalised * (logq.gather(-1, ids) - top_logp)).sum(-1)
        else:
            value = torch.zeros_like(kl)
        advantage = reward - value
    (-(advantage * logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))).sum().backward()
    return kl.detach(), leaf.grad, advantage


def reverse_kl_grad(student, teacher, temperature=1.0):
    leaf = student.detach().double().requires_grad_()
    logp = F.log_softmax(leaf / temperature, -1)
    logq = F.log_softmax(teacher.double() / temperature, -1)
    F.kl_div(logq, logp, reduction="none", log_target=True).sum().backward()
    return leaf.grad


def run_vopd(student, teacher, tokens, **kwargs):
    leaf = student.detach().clone().requires_grad_()
    loss = sampled_token_policy_gradient(leaf, teacher, tokens, DivergenceOptions(**kwargs))
    loss.sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("baseline,reward_clip", [("none", None), ("full", None), ("top_k", None), ("full", -1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vopd_matches_the_direct_surrogate(baseline, reward_clip, temperature):
    student, teacher = make_logits(4, 3, 50, seed=1), make_logits(4, 3, 50, seed=2)
    tokens = torch.randint(0, 47, (4, 3), generator=torch.Generator().manual_seed(3))
    loss, grad = run_vopd(student, teacher, tokens, baseline=baseline, top_k=3, reward_clip=reward_clip,
                          temperature=temperature, real_vocab_size=47)
    ref_loss, ref_grad, _ = reference_vopd(student, teacher, tokens, baseline=baseline, top_k=3,
                                           reward_clip=reward_clip, temperature=temperature, real=47)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[..., :47].double(), ref_grad[..., :47], rtol=1e-5, atol=1e-6)
    assert not grad[..., 47:].any()  # padding gets no gradient


def per_sample_gradients(student_row, teacher_row, tokens, baseline, top_k=2):
    """[n, V] gradient of each sampled token's surrogate, the logits row repeated n times."""
    n = tokens.shape[0]
    leaf = student_row.expand(n, -1).clone().requires_grad_()
    sampled_token_policy_gradient(leaf, teacher_row.expand(n, -1), tokens,
                                  DivergenceOptions(baseline=baseline, top_k=top_k)).sum().backward()
    return leaf.grad.double()


@pytest.mark.parametrize("baseline", ["none", "full", "top_k"])
def test_vopd_expected_gradient_is_the_reverse_kl_gradient(baseline):
    """Exact expectation (enumerating y) and a Monte-Carlo average of tokens drawn from the student."""
    student, teacher = make_logits(1, 6, seed=4), make_logits(1, 6, seed=5)
    target = reverse_kl_grad(student, teacher)[0]
    p = torch.softmax(student.double(), -1)[0]
    every = per_sample_gradients(student, teacher, torch.arange(6), baseline)
    torch.testing.assert_close((p.unsqueeze(-1) * every).sum(0), target, rtol=1e-6, atol=1e-7)
    n = 40000
    draws = torch.multinomial(p.float(), n, replacement=True, generator=torch.Generator().manual_seed(6))
    grads = per_sample_gradients(student, teacher, draws, baseline)
    mean, sd = grads.mean(0), grads.std(0)
    # Each component's Monte-Carlo error is ~ N(0, sd^2 / n): allow 4.5 standard errors (all 6 components
    # pass together with probability > 0.9999 for independent errors).
    standard_error = sd / math.sqrt(n)
    assert ((mean - target).abs() <= 4.5 * standard_error + 1e-9).all(), (mean, target, standard_error)


# (student logit scale, teacher logit scale) -> the smallest accepted variance ratios (none / baseline) for the
# full and the top-8 baseline. Measured with these seeds: 1.56 / 1.38 for equally spread models, 2.69 / 2.55
# for a diffuse student and a peaked teacher (the privileged teacher's regime). Each total is a mean over 8
# states of 4000 draws: its relative sampling error is a few per cent, far inside the margins.
VARIANCE_CASES = {(2.0, 2.0): (1.3, 1.15), (1.0, 4.0): (2.2, 2.0)}


@pytest.mark.parametrize("scales", sorted(VARIANCE_CASES))
def test_vopd_baseline_lowers_the_variance(scales):
    """Total per-sample gradient variance (trace of the covariance) with and without the baseline."""
    gen = torch.Generator().manual_seed(7)
    totals = {}
    for baseline in ("none", "full", "top_k"):
        variances = []
        for row in range(8):  # 8 states, a 32-token vocabulary
            student = make_logits(1, 32, scale=scales[0], seed=10 + row)
            teacher = make_logits(1, 32, scale=scales[1], seed=40 + row)
            draws = torch.multinomial(torch.softmax(student, -1)[0], 4000, replacement=True, generator=gen)
            variances.append(per_sample_gradients(student, teacher, draws, baseline, top_k=8).var(0).sum())
        totals[baseline] = float(torch.stack(variances).mean())
    full_ratio, top_k_ratio = totals["none"] / totals["full"], totals["none"] / totals["top_k"]
    assert full_ratio > VARIANCE_CASES[scales][0] and top_k_ratio > VARIANCE_CASES[scales][1], totals


def reference_diagnostics(student, teacher, top_k, temperature=1.0, real=None):
    real = real or student.shape[-1]
    logp = F.log_softmax(student[..., :real].double() / temperature, -1)
    logq = F.log_softmax(teacher[..., :real].double() / temperature, -1)
    entropy_s = -(logp.exp() * logp).sum(-1)
    entropy_t = -(logq.exp() * logq).sum(-1)
    ids = logp.topk(top_k, dim=-1).indices
    tail = 1.0 - logq.exp().gather(-1, ids).sum(-1)
    return entropy_s, entropy_t, tail


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "mixed"])
def test_diagnostics_match_direct_computation(divergence):
    student, teacher = make_logits(3, 4, 40, seed=8), make_logits(3, 4, 40, seed=9)
    sink = DiagnosticsSink(top_k=5)
    plain = DivergenceOptions(divergence=divergence, beta=0.4, temperature=0.8, real_vocab_size=37)
    loss = vocab_parallel_divergence(student, teacher, dataclasses.replace(plain, diagnostics=sink))
    plain = vocab_parallel_divergence(student, teacher, plain)
    assert torch.equal(loss, plain)  # the diagnostics leave the loss bitwise unchanged
    rows = sink.take().double()
    entropy_s, entropy_t, tail = reference_diagnostics(student, teacher, 5, 0.8, 37)
    torch.testing.assert_close(rows[:, 0], entropy_s.reshape(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[:, 1], entropy_t.reshape(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[:, 2], loss.reshape(-1).double())
    torch.testing.assert_close(rows[:, 3], tail.reshape(-1), rtol=1e-5, atol=1e-6)
    assert rows[:, 4].isnan().all()  # no advantage for a full-vocabulary divergence


def test_vopd_diagnostics_carry_the_advantage():
    student, teacher = make_logits(5, 30, seed=11), make_logits(5, 30, seed=12)
    tokens = torch.tensor([0, 3, 7, 11, 29])
    sink = DiagnosticsSink(top_k=4)
    sampled_token_policy_gradient(student, teacher, tokens, DivergenceOptions(baseline="full", diagnostics=sink))
    rows = sink.take().double()
    _, _, advantage = reference_vopd(student, teacher, tokens, baseline="full")
    entropy_s, entropy_t, tail = reference_diagnostics(student, teacher, 4)
    torch.testing.assert_close(rows[:, 4], advantage, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[:, 0], entropy_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[:, 3], tail, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "mixed"])
def test_fused_diagnostics_match_direct_computation(divergence):
    """The output-layer-fused loss (chunks of 3 tokens) fills the same diagnostics from its own collectives."""
    from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence

    gen = torch.Generator().manual_seed(13)
    hs, ht = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 12, generator=gen)
    ws, wt = torch.randn(40, 8, generator=gen), torch.randn(40, 12, generator=gen)
    sink = DiagnosticsSink(top_k=4)
    options = DivergenceOptions(divergence=divergence, beta=0.4, temperature=1.1, real_vocab_size=37,
                                diagnostics=sink, chunk_size=3)
    loss = fused_chunked_divergence(hs, ws, ht, wt, options)
    rows = sink.take().double()
    entropy_s, entropy_t, tail = reference_diagnostics(hs @ ws.t(), ht @ wt.t(), 4, 1.1, 37)
    torch.testing.assert_close(rows[:, 0], entropy_s.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[:, 1], entropy_t.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[:, 2], loss.reshape(-1).double())
    torch.testing.assert_close(rows[:, 3], tail.reshape(-1), rtol=1e-5, atol=1e-5)


def test_divergence_options_from_the_config():
    sink = DiagnosticsSink(3)
    cfg = DistillConfig(loss="mixed", beta=0.2, mix_weight=0.7, temperature=1.3, fused=True, chunk_size=5,
                        vopd_baseline="top_k", top_k=3, vopd_reward_clip=-2.0)
    options = DivergenceOptions.from_config(cfg, 37, None, sink)
    assert options == DivergenceOptions(divergence="mixed", beta=0.7, temperature=1.3, real_vocab_size=37,
                                        tp_group=None, diagnostics=sink, fused=True, chunk_size=5, baseline="top_k",
                                        top_k=3, reward_clip=-2.0)
    assert DivergenceOptions.from_config(dataclasses.replace(cfg, loss="jsd"), 37).beta == 0.2  # JSD reads beta
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 0.1
    # The sampled-token estimator estimates reverse KL only; other divergences are refused, not ignored.
    student, teacher = torch.randn(4, 37), torch.randn(4, 37)
    with pytest.raises(ValueError, match="reverse KL"):
        sampled_token_policy_gradient(student, teacher, torch.zeros(4, dtype=torch.long), DivergenceOptions("jsd"))


def fused_vopd_inputs(seed=21, vocab_s=40, vocab_t=48, real=37):
    gen = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(7, 3, 16, generator=gen), torch.randn(7, 3, 24, generator=gen)
    ws, wt = torch.randn(vocab_s, 16, generator=gen) * 0.5, torch.randn(vocab_t, 24, generator=gen) * 0.5
    ws[real:], wt[real:] = 100.0, -100.0  # would dominate every softmax if padding leaked in
    tokens = torch.randint(0, real, (7, 3), generator=gen)
    return hs, ws, ht, wt, tokens, torch.rand(7, 3, generator=gen)


def reference_fused_vopd(hs, ws, ht, wt, tokens, grad_out, **kwargs):
    """fp64 (KL, dL/dh, dL/dW, advantage) of sum(g * surrogate) through the output matmul, straight from F."""
    hs64, ws64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    logits = hs64 @ ws64.t()
    kl, grad_logits, advantage = reference_vopd(logits, ht.double() @ wt.double().t(), tokens, **kwargs)
    logits.backward(grad_logits * grad_out.double().unsqueeze(-1))  # per-token terms are separable
    return kl, hs64.grad, ws64.grad, advantage


@pytest.mark.parametrize("baseline,reward_clip", [("none", None), ("full", None), ("top_k", None), ("full", -1.0)])
@pytest.mark.parametrize("chunk_size", [1, 4, 21, 64])
def test_fused_vopd_matches_unfused_and_reference(baseline, reward_clip, chunk_size):
    from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence

    hs, ws, ht, wt, tokens, grad_out = fused_vopd_inputs()
    options = DivergenceOptions("vopd", baseline=baseline, top_k=3, reward_clip=reward_clip, temperature=0.8,
                                real_vocab_size=37, chunk_size=chunk_size)
    hs1, ws1, sink1 = hs.clone().requires_grad_(), ws.clone().requires_grad_(), DiagnosticsSink(4)
    fused = fused_chunked_divergence(hs1, ws1, ht, wt, dataclasses.replace(options, diagnostics=sink1), tokens)
    (fused * grad_out).sum().backward()
    hs2, ws2, sink2 = hs.clone().requires_grad_(), ws.clone().requires_grad_(), DiagnosticsSink(4)
    unfused = sampled_token_policy_gradient(hs2 @ ws2.t(), ht @ wt.t(), tokens,
                                            dataclasses.replace(options, diagnostics=sink2))
    (unfused * grad_out).sum().backward()
    ref_kl, ref_h, ref_w, advantage = reference_fused_vopd(hs, ws, ht, wt, tokens, grad_out, baseline=baseline,
                                                           top_k=3, reward_clip=reward_clip, temperature=0.8, real=37)
    assert fused.shape == (7, 3) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.double(), ref_kl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hs1.grad.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws1.grad.double(), ref_w, rtol=1e-5, atol=1e-5)
    assert not ws1.grad[37:].any()  # padding rows get no gradient
    rows1, rows2 = sink1.take(), sink2.take()
    torch.testing.assert_close(rows1, rows2, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(rows1[:, 4].double(), advantage.reshape(-1), rtol=1e-5, atol=1e-5)


def test_fused_vopd_refuses_missing_tokens_and_other_divergences():
    from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence

    hs, ws, ht, wt, tokens, _ = fused_vopd_inputs()
    with pytest.raises(ValueError, match="sampled tokens"):
        fused_chunked_divergence(hs, ws, ht, wt, DivergenceOptions("vopd", real_vocab_size=37))
    with pytest.raises(ValueError, match="sampled tokens"):
        fused_chunked_divergence(hs, ws, ht, wt, DivergenceOptions("vopd", real_vocab_size=37), tokens[:3])
    with pytest.raises(ValueError, match="baseline"):
        fused_chunked_divergence(hs, ws, ht, wt, DivergenceOptions("vopd", baseline="mean"), tokens)
