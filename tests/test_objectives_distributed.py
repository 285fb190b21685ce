"""vOPD, mixed KL and the diagnostics at TP = 1 and 2 (gloo) against the fp64 torch.nn.functional references
of tests/test_objectives.py and tests/test_losses.py on the full logits; the diagnostics must ride on the
loss's one forward collective."""
import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from test_losses import assert_close, reference_divergence
from test_losses_distributed import _Counter, _shard
from test_objectives import reference_diagnostics, reference_vopd

VOCAB, REAL, TOKENS, TOP_K, TEMPERATURE = 64, 61, (4, 3), 5, 0.9
VOPD_CASES = [("none", None), ("full", None), ("top_k", None), ("full", -0.5)]


def _inputs():
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(*TOKENS, VOCAB, generator=gen) * 2
    teacher = torch.randn(*TOKENS, VOCAB, generator=gen) * 2
    student[..., REAL:], teacher[..., REAL:] = 1e4, 1e4  # would dominate every softmax if padding leaked in
    tokens = torch.randint(0, REAL, TOKENS, generator=gen)
    return student, teacher, tokens


def _worker(rank, world):
    from caopd_megatron.distill.divergence_options import DivergenceOptions
    from caopd_megatron.distill.losses import vocab_parallel_divergence
    from caopd_megatron.distill.sampled_token import sampled_token_policy_gradient
    from caopd_megatron.distill.token_diagnostics import DiagnosticsSink

    group = dist.group.WORLD if world > 1 else None
    counter = _Counter()
    student, teacher, tokens = _inputs()
    out = {}
    for baseline, clip in VOPD_CASES:
        leaf = _shard(student, rank, world).requires_grad_()
        sink = DiagnosticsSink(TOP_K)
        counter.take()
        options = DivergenceOptions("vopd", baseline=baseline, top_k=TOP_K, reward_clip=clip, temperature=TEMPERATURE,
                                    real_vocab_size=REAL, tp_group=group, diagnostics=sink)
        loss = sampled_token_policy_gradient(leaf, _shard(teacher, rank, world), tokens, options)
        fwd = counter.take()
        loss.sum().backward()
        out[("vopd", baseline, clip)] = dict(loss=loss.detach(), grad=leaf.grad, rows=sink.take(), fwd=fwd,
                                             bwd=counter.take())
    for divergence in ("mixed", "reverse_kl", "jsd"):
        leaf = _shard(student, rank, world).requires_grad_()
        sink = DiagnosticsSink(TOP_K)
        counter.take()
        options = DivergenceOptions(divergence, beta=0.3, temperature=TEMPERATURE, real_vocab_size=REAL,
                                    tp_group=group, diagnostics=sink)
        loss = vocab_parallel_divergence(leaf, _shard(teacher, rank, world), options)
        fwd = counter.take()
        loss.sum().backward()
        out[(divergence,)] = dict(loss=loss.detach(), grad=leaf.grad, rows=sink.take(), fwd=fwd, bwd=counter.take())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_objectives_and_diagnostics_match_the_reference_under_tensor_parallelism(world):
    per_rank = run_distributed(_worker, world)
    student, teacher, tokens = _inputs()
    h_s, h_t, tail = (t.reshape(-1) for t in reference_diagnostics(student, teacher, TOP_K, TEMPERATURE, REAL))
    for key in per_rank[0]:
        results = [r[key] for r in per_rank]
        grad = torch.cat([r["grad"] for r in results], dim=-1)
        if key[0] == "vopd":
            ref_loss, ref_grad, advantage = reference_vopd(student, teacher, tokens, baseline=key[1], top_k=TOP_K,
                                                           reward_clip=key[2], temperature=TEMPERATURE, real=REAL)
            ref_grad = ref_grad[..., :REAL]
        else:
            leaf = student.double().requires_grad_()
            ref_loss = reference_divergence(leaf, teacher.double(), key[0], beta=0.3, temperature=TEMPERATURE,
                                            real_vocab_size=REAL)
            ref_loss.sum().backward()
            ref_grad, advantage = leaf.grad[..., :REAL], None
        for r in results:
            assert torch.equal(r["loss"], results[0]["loss"]), key  # bitwise the same on every TP rank
            torch.testing.assert_close(r["rows"], results[0]["rows"], rtol=0, atol=0, equal_nan=True)
            expected_gathers = 0 if world == 1 else (2 if key[0] == "jsd" else 1)
            assert r["fwd"]["gather"] == expected_gathers and r["fwd"]["all_reduce"] == 0, (key, r["fwd"])
            assert sum(r["bwd"].values()) == 0, (key, r["bwd"])
        assert_close(results[0]["loss"], ref_loss.detach())
        assert_close(grad[..., :REAL], ref_grad, atol=1e-5)
        assert not grad[..., REAL:].any()
        rows = results[0]["rows"].double()
        assert_close(rows[:, 0], h_s, rtol=1e-5, atol=1e-6)
        assert_close(rows[:, 1], h_t, rtol=1e-5, atol=1e-6)
        assert_close(rows[:, 3], tail, rtol=1e-5, atol=1e-6)
        if advantage is not None:
            assert_close(rows[:, 4], advantage.reshape(-1), rtol=1e-5, atol=1e-6)
