"""One distillation step under TP, PP, DP and their products equals the single-process step.

Reference: a one-process run builds the student and teacher from seeds, records their initial full weights,
and takes one step (loss, gradient norm, gathered gradients, updated weights, EMA teacher). Every layout
loads those same initial weights shard by shard (``parallel.state.load_full_state_dict``), takes the same
step on the same examples, and gathers gradients / weights / the EMA teacher back to global names.

To keep start-up cost low (megatron's import is seconds per process on 2 cores) each spawned world runs
several layouts in a row, re-initialising megatron's parallel state between them:
- 2 processes: TP=2, PP=2, DP=2;
- 4 processes: TP=2 x PP=2, TP=2 x DP=2, PP=2 x DP=2.
Sampling (greedy and at temperature 1) through TP shards and pipeline stages is compared too.
Scenarios, all in every layout: (A) a teacher of the student's size, reverse KL, unfused, micro-batches of
2 over 5 examples (uneven DP split, a padded last micro-batch), replay cross entropy, EMA update; (B) a
teacher of another size (hidden 48, 4 layers, ffn 96; ``TEACHER_B``), fused chunked JSD, a student with tied
embeddings (under PP the embedding gradient is all-reduced between first and last stage), skip_first_tokens.
"""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed

from parallel_helpers import STUDENT, TEACHER_B, VOCAB
from parallel_helpers import build as _build
from parallel_helpers import examples as _examples
from parallel_helpers import init_parallel as _init_parallel

SCENARIOS = {
    "A": dict(student=STUDENT, teacher=STUDENT, distill=dict(loss="reverse_kl", micro_batch_size=2),
              replay=2, ema=0.25),
    "B": dict(student={**STUDENT, "tie_embeddings": True}, teacher=TEACHER_B,
              distill=dict(loss="jsd", beta=0.3, fused=True, chunk_size=3, micro_batch_size=2, skip_first_tokens=1),
              replay=0, ema=None),
}
LAYOUTS_2 = [(2, 1), (1, 2), (1, 1)]  # (TP, PP); DP = world / (TP x PP)
LAYOUTS_4 = [(2, 2), (2, 1), (1, 2)]


def _step(name: str, tp: int, pp: int, init: dict | None) -> dict:
    """One step of scenario ``name`` under (tp, pp); ``init`` None = build from seeds (the reference)."""
    from caopd_megatron.config.schema import DistillConfig, OptimConfig
    from caopd_megatron.distill.optim import build_optimizer, build_scheduler
    from caopd_megatron.distill.sft import SupervisedRows
    from caopd_megatron.distill.step import distill_step
    from caopd_megatron.models.teacher import ema_update, freeze
    from caopd_megatron.parallel.data_parallel import wrap_student
    from caopd_megatron.parallel.state import gather_full_state_dict, load_full_state_dict
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    sc = SCENARIOS[name]
    student = _build(sc["student"], tp, pp, seed=1)
    teacher = freeze(_build(sc["teacher"], tp, pp, seed=2))
    out: dict = {}
    if init is None:
        out["init_student"] = gather_full_state_dict(student)
        out["init_teacher"] = gather_full_state_dict(teacher)
    else:
        # Seeded builds start from the single-process weights in every layout (builder's CPU initialisation).
        out["seeded_student"] = gather_full_state_dict(student)
        out["seeded_teacher"] = gather_full_state_dict(teacher)
        load_full_state_dict(student, init["init_student"])
        load_full_state_dict(teacher, init["init_teacher"])
    student = wrap_student(student)
    if name == "A":
        # Decoding through the pipeline / TP shards: sampled and greedy, prompts of different lengths.
        prompts = [e.student_prompt_ids for e in _examples()]
        for temperature in (1.0, 0.0):
            gens = generate(student, prompts, SamplingParams(max_new_tokens=5, temperature=temperature, seed=7),
                            eos_id=3, real_vocab_size=VOCAB, batch_size=3)
            out[f"generate_t{temperature}"] = [(g.response_ids, g.logprobs) for g in gens]
    ocfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1)
    opt = build_optimizer(student.parameters(), ocfg)
    sched = build_scheduler(opt, ocfg, 10)
    examples = _examples()
    cfg = DistillConfig(grad_clip=0.5, **sc["distill"])
    chosen = examples[1:1 + sc["replay"]]
    replay = SupervisedRows([e.teacher_prompt_ids for e in chosen], [e.response_ids for e in chosen], 0) if chosen else None
    stats = distill_step(student, teacher, opt, sched, examples, cfg, 0, VOCAB, extra_loss=replay)
    out.update(loss=stats.loss, grad_norm=stats.grad_norm, tokens=stats.tokens, sequences=stats.sequences,
               grads=gather_full_state_dict(student, grads=True), weights=gather_full_state_dict(student))
    if sc["ema"] is not None:
        ema_update(teacher, student, sc["ema"])
        out["ema_teacher"] = gather_full_state_dict(teacher)
    return out


def _reference(rank: int, world: int) -> dict:
    _init_parallel(1, 1)
    return {name: _step(name, 1, 1, None) for name in SCENARIOS}


def _layouts(rank: int, world: int, layouts: list, refs: dict) -> dict:
    from megatron.core import parallel_state

    results = {}
    for tp, pp in layouts:
        _init_parallel(tp, pp)
        for name in SCENARIOS:
            r = _step(name, tp, pp, refs[name])
            r["dp"] = parallel_state.get_data_parallel_world_size()
            results[(tp, pp, name)] = r
    return results


@pytest.fixture(scope="module")
def references() -> dict:
    (ref,) = run_distributed(_reference, 1)
    return ref


def _close_dicts(got: dict, want: dict, what: str, atol: float = 2e-6) -> None:
    assert set(got) == set(want), f"{what}: names differ: {set(got) ^ set(want)}"
    for k, w in want.items():
        g = got[k]
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            g, w = g[:VOCAB], w[:VOCAB]  # padded rows are never used and may differ in count
        torch.testing.assert_close(g, w, rtol=2e-4, atol=atol, msg=lambda m: f"{what} {k}: {m}")


def _check(results: dict, refs: dict, world: int) -> None:
    for (tp, pp, name), r in results.items():
        ref = refs[name]
        label = f"TP={tp} PP={pp} DP={r['dp']} scenario {name}"
        assert r["dp"] == world // (tp * pp)
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), label
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), label
        assert (r["tokens"], r["sequences"]) == (ref["tokens"], ref["sequences"]), label
        _close_dicts(r["seeded_student"], ref["init_student"], f"{label} seeded student init", atol=0.0)
        _close_dicts(r["seeded_teacher"], ref["init_teacher"], f"{label} seeded teacher init", atol=0.0)
        _close_dicts(r["grads"], ref["grads"], f"{label} grad")
        # Adam's first step is ~lr * g / (|g| + eps): for |g| near eps an fp32-rounding difference in g moves the
        # update by a visible fraction of lr, so weights are compared to 1e-3 of one step (lr = 1e-2).
        _close_dicts(r["weights"], ref["weights"], f"{label} weight", atol=1e-5)
        for key in ("generate_t1.0", "generate_t0.0"):
            if key in ref:
                assert [g[0] for g in r[key]] == [g[0] for g in ref[key]], f"{label} {key} tokens"
                for (_, lp), (_, lp_ref) in zip(r[key], ref[key]):
                    assert lp == pytest.approx(lp_ref, rel=1e-4, abs=1e-5), f"{label} {key} logprobs"
        if "ema_teacher" in ref:
            _close_dicts(r["ema_teacher"], ref["ema_teacher"], f"{label} EMA teacher")


def test_reference_is_a_real_step(references) -> None:
    assert references["A"]["grad_norm"] > 0.5  # clipping (grad_clip=0.5) is exercised
    for name, ref in references.items():
        assert ref["loss"] > 0
        moved = max(float((ref["weights"][k] - ref["init_student"][k]).abs().max()) for k in ref["weights"])
        assert moved > 1e-3, name


def test_two_process_layouts_tp2_pp2_dp2(references) -> None:
    results = run_distributed(_layouts, 2, LAYOUTS_2, references)
    # Every rank gathered the same replica; compare rank 0's and check the others agree on the loss.
    _check(results[0], references, 2)
    for key in results[0]:
        assert results[1][key]["loss"] == results[0][key]["loss"]


def test_four_process_layouts_tp2xpp2_tp2xdp2_pp2xdp2(references) -> None:
    results = run_distributed(_layouts, 4, LAYOUTS_4, references)
    _check(results[0], references, 4)
    for rank in range(1, 4):
        for key in results[0]:
            assert results[rank][key]["loss"] == results[0][key]["loss"]


@pytest.mark.parametrize("tp, pp, world, model, needle", [
    (3, 1, 3, dict(num_layers=2, num_heads=4, groups=None), "model.num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (4, 1, 4, dict(num_layers=2, num_heads=8, groups=2), "model.num_query_groups=2 is not divisible by tensor_model_parallel_size=4"),
    (1, 2, 2, dict(num_layers=3, num_heads=4, groups=None), "model.num_layers=3 is not divisible by pipeline_model_parallel_size=2"),
    (2, 2, 6, dict(num_layers=4, num_heads=4, groups=None), "world size 6 is not a multiple of TP x PP = 2 x 2 = 4"),
])
def test_impossible_layouts_name_the_numbers(tp, pp, world, model, needle) -> None:
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.runtime.distributed import LayoutError, check_layout

    with pytest.raises(LayoutError) as info:
        check_layout(world, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                     model["num_layers"], model["num_heads"], model["groups"])
    assert needle in str(info.value)


def test_teacher_of_another_size_must_split_the_same_way_at_start(tmp_path) -> None:
    """The teacher shares the student's layout: its numbers are checked at start, before any process group."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    proc = subprocess.run([sys.executable, "-m", "caopd_megatron.cli.main", "demo", f"run.output_dir={tmp_path}",
                           "teacher.mode=separate", "teacher.model.num_layers=3", "model.num_layers=2",
                           "parallel.pipeline_model_parallel_size=2", "logging.progress=false"],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(root)}, cwd=root, timeout=300)
    assert proc.returncode == 2
    assert "teacher.model.num_layers=3 is not divisible by pipeline_model_parallel_size=2" in proc.stderr
