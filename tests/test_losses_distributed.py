"""Multi-process (gloo) tests of the distillation losses (caopd_megatron.distill) at TP = 1, 2 and 4.

Every rank builds the same full logits from a seed, keeps its vocabulary shard, and returns its per-token
loss, its gradient shard and the number of collectives it issued. The parent concatenates the shards and
compares with the fp64 single-rank reference of tests/test_losses.py on the full logits.
"""
import math

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from test_losses import assert_close, reference_divergence

# name, divergence, beta, temperature, student padded vocab, teacher padded vocab, real vocab, dtype, tokens
CASES = [
    ("rkl_same", "reverse_kl", 0.5, 1.0, 64, 64, None, torch.float32, (5, 2)),
    ("fkl_pad", "forward_kl", 0.5, 0.8, 64, 64, 61, torch.float32, (5, 2)),
    ("jsd_pad", "jsd", 0.3, 1.5, 64, 64, 61, torch.float32, (5, 2)),
    ("rkl_qwen_like", "reverse_kl", 0.5, 1.0, 96, 112, 90, torch.float32, (3, 3)),
    ("jsd_qwen_like", "jsd", 0.7, 1.0, 96, 112, 90, torch.float32, (3, 3)),
    ("fkl_far_shift", "forward_kl", 0.5, 1.0, 64, 128, 60, torch.float32, (4, 2)),
    ("rkl_padding_rank", "reverse_kl", 0.5, 1.0, 128, 128, 90, torch.float32, (4, 2)),
    ("jsd_teacher_smaller", "jsd", 0.5, 1.0, 112, 96, 90, torch.float32, (4, 2)),
    ("rkl_bf16_mismatch", "reverse_kl", 0.5, 1.0, 96, 112, 90, torch.bfloat16, (4, 2)),
    ("jsd_empty", "jsd", 0.5, 1.0, 96, 112, 90, torch.float32, (0, 2)),
    ("mixed_mismatch", "mixed", 0.3, 0.9, 96, 112, 90, torch.float32, (3, 3)),
]
# name, divergence, beta, temperature, Vs, Vt, real, chunk_size
FUSED_CASES = [
    ("fused_rkl_mismatch", "reverse_kl", 0.5, 1.0, 96, 112, 90, 3),
    ("fused_jsd_pad", "jsd", 0.4, 1.3, 64, 64, 61, 4),
    ("fused_fkl_far_shift", "forward_kl", 0.5, 1.0, 64, 128, 60, 7),
    ("fused_mixed_pad", "mixed", 0.6, 1.2, 64, 64, 61, 5),
]
HIDDEN_S, HIDDEN_T = 8, 12
# Re-run with disjoint TP sub-groups (world 4 -> 2 x TP2): the cases that exercise group-rank mapping.
SUBGROUP_CASES = ("rkl_qwen_like", "fkl_far_shift", "rkl_padding_rank", "fused_rkl_mismatch")


def _logits(case):
    name, _, _, _, vocab_s, vocab_t, real, dtype, tokens = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    student = torch.randn(*tokens, vocab_s, generator=gen) * 3
    teacher = torch.randn(*tokens, vocab_t, generator=gen) * 3
    if real is not None:
        # Would dominate every softmax if padding leaked in.
        student[..., real:], teacher[..., real:] = 1e4, 1e4
    grad_out = torch.rand(*tokens, generator=gen)
    return student.to(dtype), teacher.to(dtype), grad_out


def _fused_inputs(case):
    name, _, _, _, vocab_s, vocab_t, real, _ = case
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    hs, ht = torch.randn(5, 3, HIDDEN_S, generator=gen), torch.randn(5, 3, HIDDEN_T, generator=gen)
    ws, wt = torch.randn(vocab_s, HIDDEN_S, generator=gen), torch.randn(vocab_t, HIDDEN_T, generator=gen)
    ws[real:], wt[real:] = 100.0, -100.0
    return hs, ws, ht, wt, torch.rand(5, 3, generator=gen)


def _shard(full, rank, world, dim=-1):
    part = full.shape[dim] // world
    return full.narrow(dim, rank * part, part).contiguous()


class _Counter:
    """Counts the collectives the loss issues (wrapping torch.distributed in this worker process)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "batch_isend_irecv", "all_gather",
             "broadcast")

    def __init__(self):
        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:  # all_gather_single only exists in newer torch
                continue

            def wrapped(*args, _original=original, _name=name, **kwargs):
                self.counts[_name] += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def take(self):
        counts, self.counts = self.counts, dict.fromkeys(self.NAMES, 0)
        counts["gather"] = counts.pop("all_gather_single") + counts.pop("all_gather_into_tensor")
        return counts


def _run_cases(tp_rank, tp_size, group, counter, only=None):
    from caopd_megatron.distill.divergence_options import DivergenceOptions
    from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
    from caopd_megatron.distill.losses import vocab_parallel_divergence
    from caopd_megatron.distill.sampled_token import sampled_token_advantage

    out = {}
    for case in CASES:
        if only is not None and case[0] not in only:
            continue
        name, divergence, beta, temperature, _, _, real, _, _ = case
        student, teacher, grad_out = _logits(case)
        leaf = _shard(student, tp_rank, tp_size).requires_grad_()
        counter.take()
        options = DivergenceOptions(divergence=divergence, beta=beta, temperature=temperature, real_vocab_size=real,
                                    tp_group=group)
        loss = vocab_parallel_divergence(leaf, _shard(teacher, tp_rank, tp_size), options)
        forward_counts = counter.take()
        (loss * grad_out).sum().backward()
        out[name] = dict(loss=loss.detach(), grad=leaf.grad, fwd=forward_counts, bwd=counter.take())
    for case in FUSED_CASES:
        if only is not None and case[0] not in only:
            continue
        name, divergence, beta, temperature, _, _, real, chunk = case
        hs, ws, ht, wt, grad_out = _fused_inputs(case)
        hs, ws_shard = hs.clone().requires_grad_(), _shard(ws, tp_rank, tp_size, 0).requires_grad_()
        counter.take()
        options = DivergenceOptions(divergence=divergence, beta=beta, temperature=temperature, real_vocab_size=real,
                                    tp_group=group, chunk_size=chunk)
        loss = fused_chunked_divergence(hs, ws_shard, ht, _shard(wt, tp_rank, tp_size, 0), options)
        forward_counts = counter.take()
        (loss * grad_out).sum().backward()
        out[name] = dict(loss=loss.detach(), grad_hidden=hs.grad, grad=ws_shard.grad, fwd=forward_counts,
                         bwd=counter.take())
    student, teacher, _ = _logits(CASES[3])
    tokens = torch.randint(0, 90, student.shape[:-1], generator=torch.Generator().manual_seed(0))
    adv = sampled_token_advantage(_shard(student, tp_rank, tp_size), _shard(teacher, tp_rank, tp_size), tokens,
                                  DivergenceOptions(temperature=1.3, real_vocab_size=90, tp_group=group))
    out["advantage"] = dict(loss=adv.advantage, tokens=tokens)
    return out


def _worker(rank, world, subgroup_size):
    counter = _Counter()
    results = {"world": _run_cases(rank, world, dist.group.WORLD if world > 1 else None, counter)}
    if subgroup_size:
        # Disjoint TP groups inside the world: group ranks differ from global ranks.
        groups = [dist.new_group(list(range(first, first + subgroup_size)))
                  for first in range(0, world, subgroup_size)]
        group = groups[rank // subgroup_size]
        results["sub"] = _run_cases(rank % subgroup_size, subgroup_size, group, counter, SUBGROUP_CASES)
    return results


def _check(per_rank, tp_size):
    """per_rank: the tp_size result dicts of one TP group, ordered by TP rank."""
    for case in CASES:
        name, divergence, beta, temperature, _, _, real, dtype, _ = case
        if name not in per_rank[0]:
            continue
        student, teacher, grad_out = _logits(case)
        leaf = student.double().requires_grad_()
        # The reference only reads the first `real` columns of each, so differing padded sizes are fine.
        ref = reference_divergence(leaf, teacher.double(), divergence, beta=beta, temperature=temperature,
                                   real_vocab_size=real)
        (ref * grad_out.double()).sum().backward()
        losses_by_rank = [r[name]["loss"] for r in per_rank]
        assert all(torch.equal(losses_by_rank[0], other) for other in losses_by_rank), name
        assert_close(losses_by_rank[0], ref.detach())
        grad = torch.cat([r[name]["grad"] for r in per_rank], dim=-1)
        assert grad.dtype == dtype
        tol = dict(rtol=1e-2, atol=1e-3) if dtype != torch.float32 else {}
        assert_close(grad, leaf.grad, **tol)
        if real is not None:
            assert not grad[..., real:].any(), name
        for r in per_rank:
            expected = 2 if divergence == "jsd" else 1
            if tp_size == 1 or student.numel() == 0:
                expected = 0
            assert r[name]["fwd"]["gather"] == expected, (name, r[name]["fwd"])
            assert r[name]["fwd"]["all_reduce"] == 0 and r[name]["fwd"]["all_gather"] == 0
            assert r[name]["fwd"]["batch_isend_irecv"] <= (1 if tp_size > 1 else 0)
            assert sum(r[name]["bwd"].values()) == 0, (name, r[name]["bwd"])
    for case in FUSED_CASES:
        name, divergence, beta, temperature, _, _, real, chunk = case
        if name not in per_rank[0]:
            continue
        hs, ws, ht, wt, grad_out = _fused_inputs(case)
        hs64, ws64 = hs.double().requires_grad_(), ws.double().requires_grad_()
        ref = reference_divergence(hs64 @ ws64.t(), ht.double() @ wt.double().t(), divergence, beta=beta,
                                   temperature=temperature,
                                   real_vocab_size=real)
        (ref * grad_out.double()).sum().backward()
        for r in per_rank:
            assert torch.equal(r[name]["loss"], per_rank[0][name]["loss"]), name
            assert torch.equal(r[name]["grad_hidden"], per_rank[0][name]["grad_hidden"]), name
            assert_close(r[name]["loss"], ref.detach())
            assert_close(r[name]["grad_hidden"], hs64.grad, atol=1e-5)
            chunks = math.ceil(15 / chunk)
            expected = 0 if tp_size == 1 else (2 * chunks if divergence == "jsd" else 1)
            assert r[name]["fwd"]["gather"] == expected, (name, r[name]["fwd"])
            assert r[name]["bwd"]["all_reduce"] == (1 if tp_size > 1 else 0), (name, r[name]["bwd"])
        grad_w = torch.cat([r[name]["grad"] for r in per_rank], dim=0)
        assert_close(grad_w, ws64.grad, atol=1e-5)
        assert not grad_w[real:].any()
    # Sampled-token advantage vs the direct formula.
    student, teacher, _ = _logits(CASES[3])
    tokens = per_rank[0]["advantage"]["tokens"]
    logp = torch.log_softmax(student[..., :90].double() / 1.3, -1)
    logq = torch.log_softmax(teacher[..., :90].double() / 1.3, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    expected = (logq - logp).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) + kl
    for r in per_rank:
        assert torch.equal(r["advantage"]["loss"], per_rank[0]["advantage"]["loss"])
        assert_close(r["advantage"]["loss"], expected)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_tensor_parallel_matches_single_rank_reference(world):
    results = run_distributed(_worker, world, 2 if world == 4 else 0)
    _check([r["world"] for r in results], world)
    if world == 4:
        for first in (0, 2):
            _check([r["sub"] for r in results[first:first + 2]], 2)
