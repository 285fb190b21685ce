"""Checks ``distill/batching.py`` (packing), ``distill/optim.py`` (LR schedule, clipping) and
``distill/step.py`` (the distillation loss and optimizer step).

References:
- ``pack`` / ``gather_positions``: hand-written tensors and a plain Python loop;
- ``distill_loss`` / ``distill_step``: an independent recomputation that runs student and teacher
  separately on EACH example's unpadded sequence, takes ``log_softmax`` over the real vocabulary at the
  response positions, computes KL(p_student || q_teacher) per token with plain torch ops, and averages over
  tokens then over sequences; its autograd gradient is the reference gradient; micro-batching must not
  change it (micro_batch_size 2 / 3 / 8 agree to 1e-6);
- ``lr_multiplier``: hand-computed warm-up / cosine values; ``clip_grad_norm``: torch.nn.utils.clip_grad_norm_.
"""
from __future__ import annotations

import math

import pytest
import torch

from caopd_megatron.config.schema import DistillConfig, OptimConfig
from caopd_megatron.distill.batching import PackedBatch, gather_positions, pack
from caopd_megatron.distill.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_multiplier
from helpers_models import REAL_VOCAB, full_logits, runtime, tiny_model  # noqa: F401  (runtime is a fixture)

PAD = 0


# ---------------------------------------------------------------- pack
def test_pack_hand_case():
    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=PAD)
    assert torch.equal(b.tokens, torch.tensor([[5, 6, 7, 1, 2], [8, 3, 4, 9, PAD]]))
    assert torch.equal(b.positions, torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]))
    # logits at position n-1+j predict response token j
    assert torch.equal(b.index, torch.tensor([[2, 3, 0], [0, 1, 2]]))
    assert torch.equal(b.mask, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(b.targets, torch.tensor([[1, 2, PAD], [3, 4, 9]]))
    assert b.tokens.dtype == b.index.dtype == b.targets.dtype == torch.long and b.mask.dtype == torch.float32


def test_pack_skip_first_tokens():
    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=PAD, skip_first_tokens=1)
    assert torch.equal(b.mask, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    assert torch.equal(b.index, torch.tensor([[2, 3, 0], [0, 1, 2]]))  # indices/targets are unchanged
    assert torch.equal(b.targets, torch.tensor([[1, 2, PAD], [3, 4, 9]]))
    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=PAD, skip_first_tokens=5)
    assert float(b.mask.sum()) == 0.0


def test_pack_empty_response_and_pad_id():
    b = pack([[5, 6], [7]], [[], [1]], pad_id=99)
    assert torch.equal(b.tokens, torch.tensor([[5, 6], [7, 1]]))
    assert torch.equal(b.index, torch.tensor([[0], [0]]))
    assert torch.equal(b.mask, torch.tensor([[0.0], [1.0]]))
    assert torch.equal(b.targets, torch.tensor([[99], [1]]))
    b = pack([[5, 6], [7]], [[], []], pad_id=PAD)
    assert b.index.shape == b.mask.shape == b.targets.shape == (2, 0)
    assert torch.equal(b.tokens, torch.tensor([[5, 6], [7, PAD]]))


def test_pack_errors():
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack([[1], []], [[2], [3]], pad_id=PAD)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack([[1], [2]], [[3]], pad_id=PAD)


def test_pack_index_points_at_predecessor_of_each_target():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 30, (int(n),), generator=g).tolist() for n in (1, 4, 2, 7)]
    responses = [torch.randint(1, 30, (int(n),), generator=g).tolist() for n in (3, 0, 5, 1)]
    b = pack(prompts, responses, pad_id=PAD)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert b.tokens[i, :len(p) + len(r)].tolist() == p + r
        assert all(t == PAD for t in b.tokens[i, len(p) + len(r):].tolist())
        for j in range(b.index.size(1)):
            if j < len(r):
                assert b.tokens[i, b.index[i, j] + 1] == r[j] == b.targets[i, j]
                assert b.mask[i, j] == 1.0
            else:
                assert b.mask[i, j] == 0.0


def test_packed_batch_to():
    b = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=PAD)
    c = b.to("cpu")
    assert isinstance(c, PackedBatch)
    for x, y in zip((b.tokens, b.positions, b.index, b.mask, b.targets), (c.tokens, c.positions, c.index, c.mask, c.targets)):
        assert torch.equal(x, y)


def test_gather_positions_matches_loop():
    b, L, V = 2, 5, 3
    logits = torch.tensor([[[100 * i + 10 * l + v for v in range(V)] for l in range(L)] for i in range(b)],
                          dtype=torch.float32)
    index = torch.tensor([[2, 3, 0], [0, 4, 4]])
    out = gather_positions(logits, index)
    assert out.shape == (2, 3, V)
    for i in range(b):
        for j in range(index.size(1)):
            assert torch.equal(out[i, j], logits[i, index[i, j]])
    assert out[1, 1, 2] == 100 + 40 + 2


# ---------------------------------------------------------------- LR schedule
def test_lr_multiplier_hand_values():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, schedule="cosine")
    total = 14  # 10 decay steps after warm-up; floor = min_lr / lr = 0.1
    mult = lambda s: lr_multiplier(s, total, cfg, 1e-3)  # noqa: E731
    assert [mult(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert mult(4) == pytest.approx(1.0)  # progress 0
    assert mult(9) == pytest.approx(0.1 + 0.9 * 0.5)  # progress 0.5: cos(pi/2) = 0
    assert mult(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert mult(14) == pytest.approx(0.1)
    assert mult(100) == pytest.approx(0.1)  # stays at the floor past the end


def test_lr_multiplier_variants():
    const = OptimConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    assert [lr_multiplier(s, 10, const, 1e-3) for s in (0, 1, 2, 9, 50)] == pytest.approx([0.5, 1, 1, 1, 1])
    no_warm = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert lr_multiplier(0, 10, no_warm, 1e-3) == pytest.approx(1.0)
    assert lr_multiplier(5, 10, no_warm, 1e-3) == pytest.approx(0.5)
    assert lr_multiplier(10, 10, no_warm, 1e-3) == pytest.approx(0.0, abs=1e-12)
    short = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5)
    assert lr_multiplier(7, 5, short, 1e-3) == 1.0  # total_steps <= warmup: constant after warm-up
    high_floor = OptimConfig(lr=1e-3, min_lr=1e-2, warmup_steps=0)
    assert lr_multiplier(3, 10, high_floor, 1e-3) == 1.0  # min_lr above lr: floor clamped to 1
    assert lr_multiplier(3, 10, no_warm, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_build_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=2, weight_decay=0.0)
    opt = build_optimizer([p], cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)
    sched = build_scheduler(opt, cfg, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    floor = 0.1
    expected = [0.5, 1.0, 1.0, floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25)),
                floor + (1 - floor) * 0.5, floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.75)), floor]
    assert seen == pytest.approx([2e-3 * m for m in expected])
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], cfg)


def test_schedule_resumes_from_a_lambdalr_state_dict():
    """Checkpoints written when the schedule was a ``LambdaLR`` load into ``LRSchedule`` and continue alike."""
    cfg = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=2)
    old_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=cfg.lr)
    old = torch.optim.lr_scheduler.LambdaLR(old_opt, lambda s: lr_multiplier(s, 6, cfg, cfg.lr))
    for _ in range(3):
        old_opt.step()
        old.step()
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, lr=5.0)  # another base until loaded
    sched = build_scheduler(opt, cfg, total_steps=6)
    sched.load_state_dict(old.state_dict())
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == old_opt.param_groups[0]["lr"]
    old_opt.step()
    old.step()
    sched.step()
    assert sched.get_last_lr() == old.get_last_lr()


# ---------------------------------------------------------------- clip_grad_norm
def _params_with_grads(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (7,), (2, 2, 2), (5,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in ps[:-1]:
        p.grad = torch.randn(p.shape, generator=g)
    return ps  # the last one has no gradient


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(runtime, max_norm):
    ours, ref = _params_with_grads(0), _params_with_grads(0)
    norm = clip_grad_norm(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert norm == pytest.approx(float(ref_norm), rel=1e-6)
    naive = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in _params_with_grads(0) if p.grad is not None))
    assert norm == pytest.approx(naive, rel=1e-6)
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    if max_norm < naive:
        total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ours if p.grad is not None))
        assert total == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_zero_means_no_clipping(runtime):
    ps, orig = _params_with_grads(1), _params_with_grads(1)
    norm = clip_grad_norm(ps, 0.0)
    assert norm > 1.0
    assert all(a.grad is None or torch.equal(a.grad, b.grad) for a, b in zip(ps, orig))


# ---------------------------------------------------------------- distill_loss / distill_step
@pytest.fixture(scope="module")
def step_mod():
    pytest.importorskip("caopd_megatron.distill.losses")
    import caopd_megatron.distill.step as step

    return step


def make_examples():
    from caopd_megatron.data.records import DistillExample

    g = torch.Generator().manual_seed(123)
    rnd = lambda n: torch.randint(3, REAL_VOCAB, (n,), generator=g).tolist()  # noqa: E731
    # (student prompt len, teacher prompt len, response len): mixed lengths, two adjacent empty responses
    # (with micro_batch_size=2 one micro-batch holds no loss token at all) and a 1-token response.
    shapes = [(3, 6, 4), (1, 4, 5), (4, 9, 0), (2, 5, 0), (6, 7, 1), (5, 8, 3), (2, 2, 6), (3, 10, 2)]
    out = []
    for i, (ns, nt, m) in enumerate(shapes):
        out.append(DistillExample(prompt_id=f"p{i}", sample_index=0, student_prompt_ids=rnd(ns),
                                  teacher_prompt_ids=rnd(nt), response_ids=rnd(m), correct=bool(i % 2),
                                  stated_confidence=None, empirical_confidence=0.5, text=""))
    return out


def reference_loss(student, teacher, examples, skip_first_tokens=0):
    """Per example, unpadded: KL(p_student || q_teacher) over the real vocabulary, mean over tokens, then seqs."""
    per_seq = []
    for e in examples:
        m = len(e.response_ids)
        if m - skip_first_tokens <= 0:
            continue
        ns, nt = len(e.student_prompt_ids), len(e.teacher_prompt_ids)
        s = full_logits(student, e.student_prompt_ids + e.response_ids)[ns - 1: ns - 1 + m, :REAL_VOCAB]
        with torch.no_grad():
            t = full_logits(teacher, e.teacher_prompt_ids + e.response_ids)[nt - 1: nt - 1 + m, :REAL_VOCAB]
        logp = torch.log_softmax(s.double(), dim=-1)
        logq = torch.log_softmax(t.double(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        per_seq.append(kl[skip_first_tokens:].mean())
    return torch.stack(per_seq).mean()


def reference_grads(student, teacher, examples, skip_first_tokens=0):
    student.zero_grad(set_to_none=True)
    loss = reference_loss(student, teacher, examples, skip_first_tokens)
    loss.backward()
    grads = {n: p.grad.detach().double() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return float(loss), grads


@pytest.fixture(scope="module")
def teacher(runtime):
    t, _ = tiny_model(seed=22, init_method_std=0.1)
    t.eval()
    return t  # deliberately NOT frozen: distill_step itself must keep gradients away from it


def fresh_student():
    s, _ = tiny_model(seed=21, init_method_std=0.1)
    return s


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("fused", [False, True])
def test_distill_loss_matches_per_example_reference(step_mod, teacher, skip, fused):
    student = fresh_student()
    examples = make_examples()
    s_batch = pack([e.student_prompt_ids for e in examples], [e.response_ids for e in examples], PAD, skip)
    t_batch = pack([e.teacher_prompt_ids for e in examples], [e.response_ids for e in examples], PAD, skip)
    cfg = DistillConfig(skip_first_tokens=skip, fused=fused, chunk_size=3)
    loss = step_mod.distill_loss(student, teacher, s_batch, t_batch, cfg, REAL_VOCAB)
    ref = reference_loss(student, teacher, examples, skip)
    assert loss.dim() == 0
    assert float(ref) > 1e-3  # the two models differ, so the check is not 0 == 0
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)


def test_distill_loss_is_zero_against_itself(step_mod):
    student = fresh_student()
    copy = fresh_student()
    examples = make_examples()
    # same prompt on both sides and identical weights -> every per-token KL is 0
    b = pack([e.student_prompt_ids for e in examples], [e.response_ids for e in examples], PAD)
    loss = step_mod.distill_loss(student, copy, b, b, DistillConfig(), REAL_VOCAB)
    assert abs(float(loss)) < 1e-6


class RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it is asked to apply (i.e. after backward and clipping)."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                     if p.grad is not None}
        return super().step(closure)


def run_step(step_mod, teacher, examples, micro_batch_size, skip=0, grad_clip=0.0, lr=0.0, fused=False):
    student = fresh_student()
    opt = RecordingSGD(student.parameters(), lr=lr)
    cfg = DistillConfig(micro_batch_size=micro_batch_size, skip_first_tokens=skip, grad_clip=grad_clip, fused=fused)
    stats = step_mod.distill_step(student, teacher, opt, None, examples, cfg, pad_id=PAD, real_vocab_size=REAL_VOCAB)
    grads = {n: opt.seen[id(p)] for n, p in student.named_parameters()}
    return student, stats, grads


@pytest.mark.parametrize("skip", [0, 1])
def test_distill_step_gradient_matches_reference_and_micro_batching(step_mod, teacher, skip):
    examples = make_examples()
    ref_loss, ref_grads = reference_grads(fresh_student(), teacher, examples, skip)
    t0 = [p.detach().clone() for p in teacher.parameters()]

    results = {mbs: run_step(step_mod, teacher, examples, mbs, skip=skip) for mbs in (8, 3, 2)}
    for mbs, (_, stats, grads) in results.items():
        assert stats.loss == pytest.approx(ref_loss, rel=1e-5)
        n_tokens = sum(max(0, len(e.response_ids) - skip) for e in examples)
        assert stats.tokens == n_tokens
        assert stats.sequences == sum(len(e.response_ids) > skip for e in examples)
        for name, g in grads.items():
            torch.testing.assert_close(g.double(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"mbs={mbs} {name}")
    g8 = results[8][2]
    assert max(float(g.abs().max()) for g in g8.values()) > 1e-4  # gradients are not trivially zero
    for mbs in (3, 2):
        for name, g in results[mbs][2].items():
            torch.testing.assert_close(g, g8[name], rtol=0, atol=1e-6, msg=f"mbs={mbs} vs 8: {name}")
    # The teacher gets no gradient and is unchanged.
    for p, before in zip(teacher.parameters(), t0):
        assert p.grad is None
        assert torch.equal(p, before)


def test_distill_step_fused_gradient_matches_unfused(step_mod, teacher):
    examples = make_examples()
    _, _, unfused = run_step(step_mod, teacher, examples, 4)
    _, stats, fused = run_step(step_mod, teacher, examples, 4, fused=True)
    for name, g in fused.items():
        torch.testing.assert_close(g, unfused[name], rtol=1e-4, atol=1e-6, msg=name)


def test_distill_step_updates_weights_and_clips(step_mod, teacher):
    examples = make_examples()
    ref_loss, ref_grads = reference_grads(fresh_student(), teacher, examples)
    ref_norm = math.sqrt(sum(float((g ** 2).sum()) for g in ref_grads.values()))
    w0 = {n: p.detach().clone() for n, p in fresh_student().named_parameters()}

    # No clipping: w1 = w0 - lr * g_ref.
    student, stats, _ = run_step(step_mod, teacher, examples, 3, lr=0.5, grad_clip=0.0)
    assert stats.grad_norm == pytest.approx(ref_norm, rel=1e-4)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.detach().double(), w0[n].double() - 0.5 * ref_grads[n], rtol=1e-4, atol=1e-6)

    # Clipping to max_norm: the applied gradient is g_ref * max_norm / norm; grad_norm reports the pre-clip norm.
    max_norm = ref_norm / 4
    student, stats, grads = run_step(step_mod, teacher, examples, 3, lr=0.5, grad_clip=max_norm)
    assert stats.grad_norm == pytest.approx(ref_norm, rel=1e-4)
    applied = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    assert applied == pytest.approx(max_norm, rel=1e-4)
    for n, g in grads.items():
        torch.testing.assert_close(g.double(), ref_grads[n] * (max_norm / ref_norm), rtol=1e-4, atol=1e-7)


def test_distill_step_with_adamw_and_scheduler(step_mod, teacher):
    examples = make_examples()
    student = fresh_student()
    ocfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=4)
    opt = build_optimizer(student.parameters(), ocfg)
    sched = build_scheduler(opt, ocfg, total_steps=10)
    w0 = [p.detach().clone() for p in student.parameters()]
    cfg = DistillConfig(micro_batch_size=4)
    stats = step_mod.distill_step(student, teacher, opt, sched, examples, cfg, pad_id=PAD, real_vocab_size=REAL_VOCAB)
    assert stats.lr == pytest.approx(1e-2 * 0.25)  # the LR this step used
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)  # scheduler advanced
    assert student.training
    changed = [not torch.equal(p, w) for p, w in zip(student.parameters(), w0)]
    assert all(changed)
    # a second step on the same data lowers the loss
    stats2 = step_mod.distill_step(student, teacher, opt, sched, examples, cfg, pad_id=PAD, real_vocab_size=REAL_VOCAB)
    assert stats2.loss < stats.loss


def test_micro_batches(step_mod):
    mb = step_mod.micro_batches
    assert mb(0, 5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert mb(0, 4, 8) == [slice(0, 4)]
    assert mb(0, 3, 0) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert mb(0, 0, 4) == []


def test_extra_loss_joins_the_same_step(step_mod, teacher):
    """Replay: the extra loss's gradient is added to the distillation gradient in the same optimizer step."""
    examples = make_examples()
    _, _, base = run_step(step_mod, teacher, examples, 4)
    student = fresh_student()
    opt = RecordingSGD(student.parameters(), lr=0.0)
    cfg = DistillConfig(micro_batch_size=4, grad_clip=0.0)
    w = student.decoder.final_layernorm.weight
    step_mod.distill_step(student, teacher, opt, None, examples, cfg, pad_id=PAD, real_vocab_size=REAL_VOCAB,
                          extra_loss=lambda: 0.5 * (w ** 2).sum())
    for n, p in student.named_parameters():
        expected = base[n] + (w.detach() if p is w else 0.0)  # d/dw of 0.5 * |w|^2 is w
        torch.testing.assert_close(opt.seen[id(p)], expected, rtol=1e-5, atol=1e-6, msg=n)
