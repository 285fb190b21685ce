"""The distillation and SFT losses of real megatron-core GPTModels under TP=2 equal the single-process ones.

Reference: the same models (megatron-core's CPU initialisation builds the full master weight from the seed and
splits it, so TP=1 and TP=2 hold the same weights) run in a one-process world. Compared: the loss, the
gradient of a TP-replicated parameter (final norm), and the gathered gradient of the vocab-parallel output layer.
Each world (one process, two processes) is launched once and computes every divergence in turn from zeroed
gradients (module fixtures): a launch costs more than the losses.
"""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed

pytest.importorskip("caopd_megatron.distill.losses")

VOCAB = 40


def _examples():
    from caopd_megatron.data.records import DistillExample

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(4):
        sp = torch.randint(4, VOCAB, (3 + i,), generator=g).tolist()
        tp = torch.randint(4, VOCAB, (6 + i,), generator=g).tolist()
        r = torch.randint(4, VOCAB, (2 + (i % 3),), generator=g).tolist()
        out.append(DistillExample(f"p{i}", 0, sp, tp, r, True, None, 0.5, ""))
    return out


DIVERGENCES = ("reverse_kl", "jsd")


def _losses_under_tp(rank: int, world: int, tp: int) -> dict[str, dict]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from caopd_megatron.config.schema import DistillConfig, ModelConfig, ParallelConfig
    from caopd_megatron.distill.batching import pack
    from caopd_megatron.distill.sft import sft_loss
    from caopd_megatron.distill.step import distill_loss
    from caopd_megatron.models.builder import build_gpt_model, resolve_vocab
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    backend = detect_backend()
    par = ParallelConfig(tensor_model_parallel_size=tp)
    distributed.initialize(par, seed=0)
    groups = distributed.process_groups()
    mc = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                     make_vocab_size_divisible_by=32)  # padded to 64 under TP=1 and TP=2: same init
    vocab = resolve_vocab(mc, VOCAB, tp)
    torch.manual_seed(0)
    student = build_gpt_model(mc, par, vocab, backend, groups)
    torch.manual_seed(1)
    teacher = build_gpt_model(mc, par, vocab, backend, groups)
    ex = _examples()
    s_batch = pack([e.student_prompt_ids for e in ex], [e.response_ids for e in ex], 0)
    t_batch = pack([e.teacher_prompt_ids for e in ex], [e.response_ids for e in ex], 0)
    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    results = {}
    for divergence in DIVERGENCES:
        student.zero_grad()
        loss = distill_loss(student, teacher, s_batch, t_batch, DistillConfig(loss=divergence), VOCAB)
        loss.backward()
        out_grad = gather_from_tensor_model_parallel_region(student.output_layer.weight.grad.t().contiguous()).t()
        norm_grad = student.decoder.final_layernorm.weight.grad.clone()
        student.zero_grad()
        sft = sft_loss(student, t_batch, VOCAB)
        sft.backward()
        sft_grad = gather_from_tensor_model_parallel_region(student.output_layer.weight.grad.t().contiguous()).t()
        results[divergence] = {"loss": float(loss), "out_grad": out_grad[:VOCAB].clone(), "norm_grad": norm_grad,
                               "sft": float(sft), "sft_grad": sft_grad[:VOCAB].clone()}
    return results


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict]:
    (ref,) = run_distributed(_losses_under_tp, 1, 1)
    return ref


@pytest.fixture(scope="module")
def tp2_ranks() -> list[dict[str, dict]]:
    return run_distributed(_losses_under_tp, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_tp2_equals_single_process(divergence: str, single_process: dict, tp2_ranks: list) -> None:
    ref, (r0, r1) = single_process[divergence], [r[divergence] for r in tp2_ranks]
    assert ref["loss"] > 0
    assert len({r["loss"] for r in single_process.values()}) == len(DIVERGENCES)  # each pass its own divergence
    for r in (r0, r1):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert r["sft"] == pytest.approx(ref["sft"], rel=1e-5)
        torch.testing.assert_close(r["out_grad"], ref["out_grad"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["norm_grad"], ref["norm_grad"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["sft_grad"], ref["sft_grad"], rtol=1e-4, atol=1e-6)
