"""vOPD, mixed KL and the diagnostics at TP = 1 and 2 (gloo) against the fp64 torch.nn.functional references
of tests/test_objectives.py and tests/test_losses.py on the full logits; the diagnostics must ride on the
loss's one forward collective. vOPD on the fused path (output layer + loss, chunked) must equal the unfused
vOPD of the same logits on the same ranks and the fp64 reference through the matmul. Each world (TP = 1, 2)
is launched once for both tests (``launched``): a launch costs more than the losses."""
import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from test_losses import assert_close, reference_divergence
from test_losses_distributed import _Counter, _shard
from test_objectives import fused_vopd_inputs, reference_diagnostics, reference_fused_vopd, reference_vopd

VOCAB, REAL, TOKENS, TOP_K, TEMPERATURE = 64, 61, (4, 3), 5, 0.9
VOPD_CASES = [("none", None), ("full", None), ("top_k", None), ("full", -0.5)]
# Fused vOPD: student padded vocab 40, teacher 48, real 37 (rank 1 of TP 2 holds padding), chunk sizes.
FUSED_VOPD_CASES = [("full", None, 4), ("top_k", None, 5), ("none", -0.5, 21)]
FUSED_REAL, FUSED_TEMPERATURE = 37, 0.8


def _inputs():
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(*TOKENS, VOCAB, generator=gen) * 2
    teacher = torch.randn(*TOKENS, VOCAB, generator=gen) * 2
    student[..., REAL:], teacher[..., REAL:] = 1e4, 1e4  # would dominate every softmax if padding leaked in
    tokens = torch.randint(0, REAL, TOKENS, generator=gen)
    return student, teacher, tokens


def _fused_vopd_worker(rank, world):
    """Per case: the fused and the unfused vOPD of the same sharded weights (loss, grads, diagnostics, counts)."""
    import dataclasses

    from caopd_megatron.distill.divergence_options import DivergenceOptions
    from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
    from caopd_megatron.distill.sampled_token import sampled_token_policy_gradient
    from caopd_megatron.distill.token_diagnostics import DiagnosticsSink

    group = dist.group.WORLD if world > 1 else None
    counter = _Counter()
    hs, ws, ht, wt, tokens, grad_out = fused_vopd_inputs(vocab_s=40, vocab_t=48, real=FUSED_REAL)
    wt_shard = _shard(wt, rank, world, 0)
    out = {}
    for baseline, clip, chunk in FUSED_VOPD_CASES:
        options = DivergenceOptions("vopd", baseline=baseline, top_k=3, reward_clip=clip,
                                    temperature=FUSED_TEMPERATURE, real_vocab_size=FUSED_REAL, tp_group=group,
                                    fused=True, chunk_size=chunk)
        runs = {}
        for path in ("fused", "unfused"):
            h, w, sink = hs.clone().requires_grad_(), _shard(ws, rank, world, 0).requires_grad_(), DiagnosticsSink(4)
            counter.take()
            opts = dataclasses.replace(options, diagnostics=sink)
            if path == "fused":
                loss = fused_chunked_divergence(h, w, ht, wt_shard, opts, tokens)
            else:
                # The unfused path's caller reduces the hidden gradient over TP itself (megatron's output layer).
                h_in = h if group is None else _ReduceGradient.apply(h, group)
                loss = sampled_token_policy_gradient(h_in @ w.t(), ht @ wt_shard.t(), tokens, opts)
            fwd = counter.take()
            (loss * grad_out).sum().backward()
            runs[path] = dict(loss=loss.detach(), grad_hidden=h.grad, grad=w.grad, rows=sink.take(), fwd=fwd,
                              bwd=counter.take())
        out[(baseline, clip, chunk)] = runs
    return out


class _ReduceGradient(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient over the TP group (megatron's copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


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


def _both_workers(rank, world):
    return {"unfused": _worker(rank, world), "fused": _fused_vopd_worker(rank, world)}


@pytest.fixture(scope="module")
def launched():
    """``launched(world)``: every rank's results of both workers, from one launch per world size."""
    worlds: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in worlds:
            worlds[world] = run_distributed(_both_workers, world)
        return worlds[world]

    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_objectives_and_diagnostics_match_the_reference_under_tensor_parallelism(world, launched):
    per_rank = [r["unfused"] for r in launched(world)]
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


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_fused_vopd_equals_unfused_vopd_under_tensor_parallelism(world, launched):
    per_rank = [r["fused"] for r in launched(world)]
    hs, ws, ht, wt, tokens, grad_out = fused_vopd_inputs(vocab_s=40, vocab_t=48, real=FUSED_REAL)
    for key in per_rank[0]:
        baseline, clip, chunk = key
        ref_kl, ref_h, ref_w, advantage = reference_fused_vopd(hs, ws, ht, wt, tokens, grad_out, baseline=baseline,
                                                               top_k=3, reward_clip=clip,
                                                               temperature=FUSED_TEMPERATURE, real=FUSED_REAL)
        for path in ("fused", "unfused"):
            results = [r[key][path] for r in per_rank]
            for r in results:
                assert torch.equal(r["loss"], results[0]["loss"]), (key, path)  # bitwise the same on every rank
                assert r["fwd"]["gather"] == (0 if world == 1 else 1), (key, path, r["fwd"])
                assert r["fwd"]["all_reduce"] == 0, (key, path, r["fwd"])
                assert r["bwd"]["all_reduce"] == (0 if world == 1 else 1), (key, path, r["bwd"])  # hidden grad
                assert_close(r["grad_hidden"].double(), ref_h, rtol=1e-5, atol=1e-5)
            grad_w = torch.cat([r["grad"] for r in results], dim=0)
            assert_close(results[0]["loss"].double(), ref_kl, rtol=1e-6, atol=1e-6)
            assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5)
            assert not grad_w[FUSED_REAL:].any()
            assert_close(results[0]["rows"][:, 4].double(), advantage.reshape(-1), rtol=1e-5, atol=1e-5)
        fused, unfused = per_rank[0][key]["fused"], per_rank[0][key]["unfused"]
        assert_close(fused["loss"], unfused["loss"], rtol=1e-6, atol=1e-6)
        assert_close(fused["grad_hidden"], unfused["grad_hidden"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused["rows"], unfused["rows"], rtol=1e-5, atol=1e-6, equal_nan=True)
