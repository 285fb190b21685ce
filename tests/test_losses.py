"""Single-process tests of the distillation losses (caopd_megatron.distill) against independent fp64 references.

The references use torch.nn.functional.log_softmax / kl_div on the full (unsharded) real vocabulary, in
float64, so they share no code or numerics with the implementation under test.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from caopd_megatron.distill import divergence_passes, vocab_realign
from caopd_megatron.distill.divergence_math import DIVERGENCES
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
from caopd_megatron.distill.losses import masked_sequence_mean, vocab_parallel_divergence
from caopd_megatron.distill.sampled_token import sampled_token_advantage


# ------------------------------------------------------------------------------------------------ reference
def reference_divergence(student, teacher, kind, beta=0.5, temperature=1.0, real_vocab_size=None):
    """fp64 per-token divergence on full logits [..., V] (only the first real_vocab_size columns count)."""
    real = real_vocab_size or student.shape[-1]
    logp = F.log_softmax(student[..., :real].double() / temperature, dim=-1)
    logq = F.log_softmax(teacher[..., :real].double() / temperature, dim=-1)

    def kl(log_a, log_b):  # KL(a || b); kl_div(input=log b, target=log a)
        return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)

    if kind == "reverse_kl":
        return kl(logp, logq)
    if kind == "forward_kl":
        return kl(logq, logp)
    if kind == "mixed":  # beta is the forward-KL weight
        return beta * kl(logq, logp) + (1 - beta) * kl(logp, logq)
    beta_t = torch.tensor(beta, dtype=torch.float64)
    logm = torch.logsumexp(torch.stack((logq + torch.log(beta_t), logp + torch.log1p(-beta_t))), dim=0)
    return beta * kl(logq, logm) + (1 - beta) * kl(logp, logm)


def reference_with_grad(student, teacher, grad_out, **kwargs):
    """(loss fp64, d(sum(loss * grad_out))/d student fp64) from the reference."""
    leaf = student.detach().double().requires_grad_()
    loss = reference_divergence(leaf, teacher.detach().double(), **kwargs)
    (loss * grad_out.double()).sum().backward()
    return loss.detach(), leaf.grad


def run(student, teacher, grad_out, **kwargs):
    """(loss, grad wrt student) from the implementation under test."""
    leaf = student.detach().clone().requires_grad_()
    loss = vocab_parallel_divergence(leaf, teacher, DivergenceOptions(**kwargs))
    (loss * grad_out).sum().backward()
    return loss.detach(), leaf.grad


def make_logits(*shape, scale=3.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def assert_close(actual, expected, rtol=1e-6, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


KWARGS = [dict(divergence="reverse_kl"), dict(divergence="forward_kl"), dict(divergence="jsd", beta=0.3),
          dict(divergence="jsd", beta=0.5), dict(divergence="mixed", beta=0.3)]


# ------------------------------------------------------------------------------------------- value & grads
@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: f"{k['divergence']}{k.get('beta', '')}")
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_matches_reference_fp32(kwargs, temperature):
    student, teacher = make_logits(3, 5, 300, seed=1), make_logits(3, 5, 300, seed=2)
    grad_out = torch.rand(3, 5, generator=torch.Generator().manual_seed(3))
    loss, grad = run(student, teacher, grad_out, temperature=temperature, **kwargs)
    ref_loss, ref_grad = reference_with_grad(student, teacher, grad_out, temperature=temperature,
                                             kind=kwargs["divergence"], beta=kwargs.get("beta", 0.5))
    assert loss.dtype == torch.float32 and loss.shape == (3, 5)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_many_small_work_chunks_match_reference(monkeypatch, divergence):
    """Force 1-2 token work chunks (the large-input code path) and compare with the reference."""
    monkeypatch.setattr(divergence_passes, "MIN_WORK_BYTES", 0)
    monkeypatch.setattr(divergence_passes, "WORK_BUFFER_FRACTION", 1.0 / 64)
    student, teacher = make_logits(13, 256, seed=4), make_logits(13, 256, seed=5)
    grad_out = torch.rand(13, generator=torch.Generator().manual_seed(6))
    assert divergence_passes.rows_per_chunk(13, 256, student.numel() * 4, 3) < 3
    loss, grad = run(student, teacher, grad_out, divergence=divergence, beta=0.4, temperature=1.3)
    ref_loss, ref_grad = reference_with_grad(student, teacher, grad_out, kind=divergence, beta=0.4,
                                             temperature=1.3)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_reverse_kl_gradient_formula_against_finite_differences():
    student, teacher = make_logits(2, 17, seed=7, dtype=torch.float64), make_logits(2, 17, seed=8)
    leaf = student.float().requires_grad_()
    vocab_parallel_divergence(leaf, teacher, DivergenceOptions(temperature=1.5)).sum().backward()

    def f(z):
        return reference_divergence(z, teacher.double(), "reverse_kl", temperature=1.5).sum()

    fd = torch.autograd.functional.jacobian(f, student)
    assert_close(leaf.grad, fd, atol=1e-6)


# -------------------------------------------------------------------------------------------------- JSD
def test_jsd_end_points_are_the_kls():
    student, teacher = make_logits(4, 64, seed=9), make_logits(4, 64, seed=10)
    fkl = vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence="forward_kl"))
    rkl = vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence="reverse_kl"))
    assert torch.equal(vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence="jsd", beta=0.0)), fkl)
    assert torch.equal(vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence="jsd", beta=1.0)), rkl)
    assert_close(fkl, reference_divergence(student, teacher, "forward_kl"))
    assert_close(rkl, reference_divergence(student, teacher, "reverse_kl"))


def test_jsd_rescaled_limits():
    """J_beta / beta -> KL(q||p) as beta -> 0 and J_beta / (1 - beta) -> KL(p||q) as beta -> 1."""
    student, teacher = make_logits(4, 64, seed=11, scale=1.0), make_logits(4, 64, seed=12, scale=1.0)
    fkl = reference_divergence(student, teacher, "forward_kl")
    rkl = reference_divergence(student, teacher, "reverse_kl")
    errors = []
    for eps in (1e-2, 1e-3):
        low = vocab_parallel_divergence(student, teacher, DivergenceOptions("jsd", beta=eps)).double() / eps
        high = vocab_parallel_divergence(student, teacher, DivergenceOptions("jsd", beta=1 - eps)).double() / eps
        assert_close(low, fkl, rtol=10 * eps, atol=0)
        assert_close(high, rkl, rtol=10 * eps, atol=0)
        errors.append((low - fkl).abs().max().item())
    assert errors[1] < errors[0] / 5, "first-order convergence expected"
    # Gradients follow the same limit.
    leaf = student.clone().requires_grad_()
    # beta * q / p must be small for the linearisation, so a smaller beta than above.
    (vocab_parallel_divergence(leaf, teacher, DivergenceOptions(divergence="jsd", beta=1e-4)).sum() / 1e-4).backward()
    _, ref_grad = reference_with_grad(student, teacher, torch.ones(4), kind="forward_kl")
    assert_close(leaf.grad, ref_grad, rtol=0, atol=1e-2 * ref_grad.abs().max().item())


def test_jsd_half_is_symmetric_and_bounded():
    student, teacher = make_logits(4, 64, seed=13, scale=6.0), make_logits(4, 64, seed=14, scale=6.0)
    a = vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence="jsd", beta=0.5))
    b = vocab_parallel_divergence(teacher, student, DivergenceOptions(divergence="jsd", beta=0.5))
    assert_close(a, b)
    assert (a >= -1e-6).all() and (a <= math.log(2) + 1e-6).all()


# ------------------------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_padded_entries_are_ignored(divergence):
    real = 90
    student, teacher = make_logits(6, 96, seed=15), make_logits(6, 96, seed=16)
    grad_out = torch.rand(6, generator=torch.Generator().manual_seed(17))
    loss, grad = run(student, teacher, grad_out, divergence=divergence, real_vocab_size=real)
    ref_loss, ref_grad = reference_with_grad(student, teacher, grad_out, kind=divergence, real_vocab_size=real)
    assert_close(loss, ref_loss)
    assert_close(grad[:, :real], ref_grad[:, :real])
    assert torch.equal(grad[:, real:], torch.zeros_like(grad[:, real:]))
    for fill in (1e30, -math.inf, math.nan, 50.0):
        s2, t2 = student.clone(), teacher.clone()
        s2[:, real:], t2[:, real:] = fill, -fill
        loss2, grad2 = run(s2, t2, grad_out, divergence=divergence, real_vocab_size=real)
        assert torch.equal(loss2, loss) and torch.equal(grad2, grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mismatched_padded_sizes(divergence):
    real = 150
    student, teacher = make_logits(2, 4, 152, seed=18), make_logits(2, 4, 160, seed=19)
    teacher[..., real:] = -math.inf
    grad_out = torch.rand(2, 4, generator=torch.Generator().manual_seed(20))
    loss, grad = run(student, teacher, grad_out, divergence=divergence, real_vocab_size=real)
    ref_loss, ref_grad = reference_with_grad(student, teacher[..., :152], grad_out, kind=divergence,
                                             real_vocab_size=real)
    assert_close(loss, ref_loss)
    assert_close(grad[..., :real], ref_grad[..., :real])
    assert not grad[..., real:].any()


def test_layout_matches_megatron_vocab_utility():
    from megatron.core.tensor_parallel.utils import VocabUtility

    for vocab, world in itertools.product((152064, 151936, 96), (1, 2, 4, 8)):
        for rank in range(world):
            expected = tuple(VocabUtility.vocab_range_from_global_vocab_size(vocab, rank, world))
            assert vocab_realign.vocab_range(vocab // world, rank) == expected


def test_argument_validation():
    s, t = make_logits(2, 8), make_logits(2, 10)
    with pytest.raises(ValueError, match="real_vocab_size"):
        vocab_parallel_divergence(s, t)
    with pytest.raises(ValueError):
        vocab_parallel_divergence(s, t, DivergenceOptions(real_vocab_size=9))
    with pytest.raises(ValueError):
        vocab_parallel_divergence(s, s, DivergenceOptions(divergence="kl"))
    with pytest.raises(ValueError):
        vocab_parallel_divergence(s, s, DivergenceOptions(divergence="jsd", beta=1.5))
    with pytest.raises(ValueError):
        vocab_parallel_divergence(s, s, DivergenceOptions(temperature=0.0))
    with pytest.raises(ValueError):
        vocab_parallel_divergence(s, make_logits(3, 8))


# -------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_empty_batch(divergence):
    student = torch.zeros(0, 3, 32, requires_grad=True)
    loss = vocab_parallel_divergence(student, torch.zeros(0, 3, 32), DivergenceOptions(divergence=divergence))
    assert loss.shape == (0, 3) and loss.dtype == torch.float32
    loss.sum().backward()
    assert student.grad.shape == student.shape
    assert masked_sequence_mean(loss.t(), torch.zeros(3, 0)).item() == 0.0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(divergence):
    real = 60
    gen = torch.Generator().manual_seed(21)
    student = (torch.randint(0, 3, (5, 64), generator=gen).float() - 1) * 1e4
    teacher = (torch.randint(0, 3, (5, 64), generator=gen).float() - 1) * 1e4
    student[:, real:], teacher[:, real:] = -math.inf, -math.inf
    grad_out = torch.ones(5)
    for temperature in (1.0, 0.5):
        loss, grad = run(student, teacher, grad_out, divergence=divergence, real_vocab_size=real,
                         temperature=temperature)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref_loss, ref_grad = reference_with_grad(student, teacher, grad_out, kind=divergence,
                                                 real_vocab_size=real, temperature=temperature)
        assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
        assert_close(grad[:, :real], ref_grad[:, :real], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_inputs(dtype, divergence):
    student32, teacher32 = make_logits(4, 6, 200, seed=22), make_logits(4, 6, 200, seed=23)
    student, teacher = student32.to(dtype), teacher32.to(dtype)
    grad_out = torch.rand(4, 6, generator=torch.Generator().manual_seed(24))
    loss, grad = run(student, teacher, grad_out, divergence=divergence)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # fp32 arithmetic on the exact low-precision values: tight against the reference on the same values.
    ref_loss, ref_grad = reference_with_grad(student, teacher, grad_out, kind=divergence)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad, rtol=1e-2, atol=1e-4)  # only the final cast to `dtype` rounds
    # Loose agreement with the fp32 reference of the unrounded logits.
    ref32_loss, _ = reference_with_grad(student32, teacher32, grad_out, kind=divergence)
    assert_close(loss, ref32_loss, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bitwise_deterministic(divergence):
    student, teacher = make_logits(8, 500, seed=25), make_logits(8, 500, seed=26)
    grad_out = torch.rand(8, generator=torch.Generator().manual_seed(27))
    first = run(student, teacher, grad_out, divergence=divergence)
    second = run(student, teacher, grad_out, divergence=divergence)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_callers_tensors_unchanged_and_teacher_gets_no_grad():
    student = make_logits(3, 4, 96, seed=28, dtype=torch.bfloat16).requires_grad_()
    teacher = make_logits(3, 4, 112, seed=29, dtype=torch.bfloat16).requires_grad_()
    s_before, t_before = student.detach().clone(), teacher.detach().clone()
    for divergence in DIVERGENCES:
        vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence=divergence, real_vocab_size=90,
                                                                      temperature=0.8)).sum().backward()
    assert torch.equal(student.detach(), s_before) and torch.equal(teacher.detach(), t_before)
    assert teacher.grad is None and student.grad is not None


def test_non_contiguous_inputs():
    """[b, s, V] tensors viewed as [s, b, V] (megatron's layout) give the same values and gradients."""
    student_bsv, teacher_bsv = make_logits(2, 5, 64, seed=38), make_logits(2, 5, 64, seed=39)
    grad_out = torch.rand(5, 2, generator=torch.Generator().manual_seed(40))
    leaf = student_bsv.clone().requires_grad_()
    loss = vocab_parallel_divergence(leaf.transpose(0, 1), teacher_bsv.transpose(0, 1), DivergenceOptions("jsd"))
    (loss * grad_out).sum().backward()
    ref_loss, ref_grad = reference_with_grad(student_bsv.transpose(0, 1), teacher_bsv.transpose(0, 1), grad_out,
                                             kind="jsd")
    assert_close(loss, ref_loss)
    assert_close(leaf.grad.transpose(0, 1), ref_grad)


def test_extra_peak_memory_is_about_one_shard(monkeypatch):
    """Forward + backward allocate at most ~1.1x the student shard (the gradient + small work buffers)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(divergence_passes, "MIN_WORK_BYTES", 0)
    student = make_logits(256, 2048, seed=30).requires_grad_()
    teacher = make_logits(256, 2048, seed=31)
    shard = student.numel() * student.element_size()
    for divergence in DIVERGENCES:
        student.grad = None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            vocab_parallel_divergence(student, teacher, DivergenceOptions(divergence=divergence)).sum().backward()
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation:
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
            stack.extend(event.children)
        live = peak = 0
        for _, size in sorted(events):
            live += size
            peak = max(peak, live)
        assert shard <= peak <= 1.1 * shard, (divergence, peak / shard)


# -------------------------------------------------------------------------------------- fused chunked
def _fused_inputs(seed, vocab_s=40, vocab_t=48, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(7, 3, 16, generator=gen).to(dtype), (torch.randn(vocab_s, 16, generator=gen) * 0.5).to(dtype),
            torch.randn(7, 3, 24, generator=gen).to(dtype), (torch.randn(vocab_t, 24, generator=gen) * 0.5).to(dtype))


@pytest.mark.parametrize("kwargs", KWARGS[:3], ids=lambda k: k["divergence"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 64])
def test_fused_chunked_matches_unfused_and_reference(kwargs, chunk_size):
    hs, ws, ht, wt = _fused_inputs(32)
    real = 37
    grad_out = torch.rand(7, 3, generator=torch.Generator().manual_seed(33))
    common = dict(real_vocab_size=real, temperature=1.2, **kwargs)

    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    fused = fused_chunked_divergence(hs1, ws1, ht, wt, DivergenceOptions(chunk_size=chunk_size, **common))
    (fused * grad_out).sum().backward()

    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    unfused = vocab_parallel_divergence(hs2 @ ws2.t(), ht @ wt.t(), DivergenceOptions(**common))
    (unfused * grad_out).sum().backward()

    hs3, ws3 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref = reference_divergence(hs3 @ ws3.t(), ht.double() @ wt.double().t(), kwargs["divergence"],
                               beta=kwargs.get("beta", 0.5), temperature=1.2, real_vocab_size=real)
    (ref * grad_out.double()).sum().backward()

    assert fused.shape == (7, 3) and fused.dtype == torch.float32
    assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    assert_close(hs1.grad, hs2.grad, atol=1e-6)
    assert_close(ws1.grad, ws2.grad, atol=1e-6)
    assert_close(fused, ref)
    assert_close(hs1.grad, hs3.grad, atol=1e-6)
    assert_close(ws1.grad, ws3.grad, atol=1e-6)
    assert not ws1.grad[real:].any()


def test_fused_chunked_bf16_and_empty():
    hs, ws, ht, wt = _fused_inputs(34, vocab_s=32, vocab_t=32, dtype=torch.bfloat16)
    hs.requires_grad_()
    ws.requires_grad_()
    loss = fused_chunked_divergence(hs, ws, ht, wt, DivergenceOptions(chunk_size=8, divergence="jsd"))
    loss.sum().backward()
    assert loss.dtype == torch.float32 and hs.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.bfloat16
    ref = reference_divergence(hs.detach().float() @ ws.detach().float().t(), ht.float() @ wt.float().t(), "jsd")
    assert_close(loss, ref, rtol=5e-2, atol=5e-3)
    # Only the weight needs a gradient (frozen trunk): the hidden-state gradient is skipped.
    ws.grad = None
    fused_chunked_divergence(hs.detach(), ws, ht, wt, DivergenceOptions(chunk_size=8)).sum().backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0
    empty_h = torch.zeros(0, 2, 16, requires_grad=True)
    out = fused_chunked_divergence(empty_h, ws.detach(), torch.zeros(0, 2, 24), wt)
    out.sum().backward()
    assert out.shape == (0, 2) and empty_h.grad.shape == (0, 2, 16)


# -------------------------------------------------------------------------------- masked_sequence_mean
def test_masked_sequence_mean_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    value = masked_sequence_mean(loss, mask)
    assert value.item() == pytest.approx((1.5 + 8.5) / 2)
    value.backward()
    assert torch.equal(loss.grad, torch.tensor([[0.25, 0.25, 0.0], [0.0, 0.0, 0.0], [0.0, 0.25, 0.25]]))
    # One-token and full sequences weigh equally per sequence.
    loss2 = torch.tensor([[2.0, 100.0], [1.0, 3.0]])
    assert masked_sequence_mean(loss2, torch.tensor([[True, False], [True, True]])).item() == pytest.approx(2.0)


def test_masked_sequence_mean_all_masked_and_nan_under_mask():
    loss = torch.tensor([[math.nan, math.inf], [1.0, math.nan]], requires_grad=True)
    value = masked_sequence_mean(loss, torch.zeros(2, 2))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 2))
    loss.grad = None
    value = masked_sequence_mean(loss, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    value.backward()
    assert value.item() == 1.0 and torch.equal(loss.grad, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert masked_sequence_mean(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0


# -------------------------------------------------------------------------------- sampled-token advantage
def test_sampled_token_advantage():
    student, teacher = make_logits(5, 40, seed=35), make_logits(5, 44, seed=36)
    real, temperature = 38, 1.4
    tokens = torch.randint(0, real, (5,), generator=torch.Generator().manual_seed(37))
    options = DivergenceOptions(temperature=temperature, real_vocab_size=real)
    out = sampled_token_advantage(student, teacher, tokens, options)
    logp = F.log_softmax(student[:, :real].double() / temperature, -1)
    logq = F.log_softmax(teacher[:, :real].double() / temperature, -1)
    rkl = reference_divergence(student, teacher, "reverse_kl", temperature=temperature, real_vocab_size=real)
    ratio = (logq - logp).gather(1, tokens[:, None]).squeeze(1)
    assert_close(out.log_ratio, ratio)
    assert_close(out.reverse_kl, rkl)
    assert_close(out.advantage, ratio + rkl)
    # The baseline is exact: the advantage has zero mean under p for every token position.
    every = torch.arange(real).repeat(5)
    s_rep, t_rep = student.repeat_interleave(real, 0), teacher.repeat_interleave(real, 0)
    adv = sampled_token_advantage(s_rep, t_rep, every, options).advantage
    expectation = (logp.exp() * adv.view(5, real).double()).sum(-1)
    assert_close(expectation, torch.zeros(5), atol=2e-6)
