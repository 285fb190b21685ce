"""Numerics at the edges of the distillation losses, against fp64 torch.nn.functional references.

JSD(beta) as beta -> 1, large logits with a temperature, and a teacher with a masked (-inf) vocabulary.
The references are direct fp64 computations on the full vocabulary (tests/test_losses.py), so they share no
code with the sharded, chunked implementation.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from caopd_megatron.distill.divergence_math import DIVERGENCES, MASKED_LOGIT
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
from caopd_megatron.distill.losses import vocab_parallel_divergence
from caopd_megatron.distill.sampled_token import sampled_token_advantage
from test_losses import assert_close, make_logits, reference_divergence, reference_with_grad, run


def relative_error(actual, expected):
    return ((actual.double() - expected) / expected).abs().max().item()


@pytest.mark.parametrize("beta", [0.9999, 0.999])
def test_jsd_near_beta_one_keeps_fp32_precision(beta):
    """log(q/m) as -softplus(-x) - log beta: x - softplus(x) lost ~6e-4 relative at beta = 0.9999."""
    student, teacher = make_logits(64, 256, seed=1), make_logits(64, 256, seed=2)
    ref = reference_divergence(student, teacher, "jsd", beta=beta)
    assert relative_error(vocab_parallel_divergence(student, teacher, DivergenceOptions("jsd", beta=beta)), ref) < 1e-6
    # The fused path shares the arithmetic: identity weights make its logits the same numbers.
    eye = torch.eye(256)
    fused = fused_chunked_divergence(student.unsqueeze(1), eye, teacher.unsqueeze(1), eye,
                                     DivergenceOptions("jsd", beta=beta, chunk_size=16))
    assert relative_error(fused.squeeze(1), ref) < 1e-6


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_is_applied_after_the_row_max(divergence):
    """|z| ~ 1e4, T = 0.7: (z - max) / T is exact to fp32 rounding; z / T - max(z / T) loses ~1e-3 per logit."""
    gen = torch.Generator().manual_seed(3)
    student = 1e4 + torch.randn(16, 300, generator=gen) * 3
    teacher = -1e4 + torch.randn(16, 300, generator=gen) * 3
    grad_out = torch.ones(16)
    loss, grad = run(student, teacher, grad_out, divergence=divergence, beta=0.4, temperature=0.7)
    ref_loss, ref_grad = reference_with_grad(student, teacher, grad_out, kind=divergence, beta=0.4, temperature=0.7)
    # Dividing first: 1.3e-5 .. 6e-5 relative; subtracting first: 2e-7 .. 3e-7 (as for logits of size 3).
    assert relative_error(loss, ref_loss) < 2e-6
    assert_close(grad, ref_grad, rtol=0, atol=1e-5)
    # The same holds for the fused path (its logits come out of the output-layer matmul).
    eye = torch.eye(300)
    fused = fused_chunked_divergence(student.unsqueeze(1), eye, teacher.unsqueeze(1), eye,
                                     DivergenceOptions(divergence, beta=0.4, temperature=0.7, chunk_size=5))
    assert relative_error(fused.squeeze(1), ref_loss) < 2e-6


def _masked_reference(student, teacher, kind, beta=0.5):
    """fp64 reference with the 0 log 0 = 0 convention (F.kl_div with probability targets uses xlogy)."""
    logp = F.log_softmax(student.double(), -1)
    logq = F.log_softmax(teacher.double(), -1)  # -inf on masked entries

    def kl(target_log, input_log):  # KL(target || input), target may have zeros
        return F.kl_div(input_log, target_log.exp(), reduction="none", log_target=False).sum(-1)

    if kind == "forward_kl":
        return kl(logq, logp)
    beta_t = torch.tensor(beta, dtype=torch.float64)
    logm = torch.logsumexp(torch.stack((logq + torch.log(beta_t), logp + torch.log1p(-beta_t))), dim=0)
    return beta * kl(logq, logm) + (1 - beta) * kl(logp, logm)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_teacher_vocabulary_gives_finite_losses(divergence):
    """A teacher under constrained decoding (-inf logits) gave NaN forward KL / JSD and inf reverse KL."""
    student, teacher = make_logits(2, 4, 100, seed=4), make_logits(2, 4, 100, seed=5)
    teacher[..., ::3] = -math.inf
    teacher[0, 0, 1:50] = -math.inf  # one token with most of the vocabulary masked
    grad_out = torch.rand(2, 4, generator=torch.Generator().manual_seed(6))
    loss, grad = run(student, teacher, grad_out, divergence=divergence, beta=0.3)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # Documented convention: a -inf logit is read as MASKED_LOGIT.
    floored = teacher.masked_fill(teacher == -math.inf, MASKED_LOGIT)
    ref_loss, ref_grad = reference_with_grad(student, floored, grad_out, kind=divergence, beta=0.3)
    assert_close(loss, ref_loss, rtol=1e-5)
    assert_close(grad, ref_grad, atol=1e-5)
    if divergence in ("forward_kl", "jsd"):
        # ... which, for forward KL and JSD, is exactly the 0 log 0 = 0 limit of the masked teacher.
        assert_close(loss, _masked_reference(student, teacher, divergence, beta=0.3))
    else:
        # Reverse KL (alone, or mixed with weight 1 - 0.3) is +inf mathematically; the floor makes it a
        # steep finite penalty on the masked mass.
        logp = F.log_softmax(student.double(), -1)
        masked_mass = logp.exp().where(teacher == -math.inf, torch.zeros(())).sum(-1)
        reverse_weight = 0.7 if divergence == "mixed" else 1.0
        assert (loss.double() > reverse_weight * masked_mass * (-MASKED_LOGIT) * 0.9).all()


def test_masked_teacher_in_the_sampled_token_estimator():
    student, teacher = make_logits(6, 40, seed=7), make_logits(6, 40, seed=8)
    teacher[:, 5:15] = -math.inf
    tokens = torch.tensor([0, 5, 10, 20, 30, 14])
    out = sampled_token_advantage(student, teacher, tokens, DivergenceOptions(temperature=0.9))
    floored = teacher.masked_fill(teacher == -math.inf, MASKED_LOGIT)
    logp = F.log_softmax(student.double() / 0.9, -1)
    logq = F.log_softmax(floored.double() / 0.9, -1)
    ratio = (logq - logp).gather(1, tokens[:, None]).squeeze(1)
    assert torch.isfinite(out.advantage).all()
    assert_close(out.log_ratio, ratio, rtol=1e-5)
    assert_close(out.reverse_kl, reference_divergence(student, floored, "reverse_kl", temperature=0.9), rtol=1e-5)
