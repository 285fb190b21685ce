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
# Scenarios of some runs only. C (overlapped reduction): one replay row, so under DP=2 one replica has no
# micro-batch in the step's last call (the path where no hook may launch a reduction). Q (sequence-parallel
# layouts, with and without SP): Qwen3's QK norms, whose gradients each TP rank holds only for its own heads.
_QK = {**STUDENT, "qk_layernorm": True}
OVERLAP_ONLY = {"C": {**SCENARIOS["A"], "replay": 1}, "Q": {**SCENARIOS["A"], "student": _QK, "teacher": _QK}}
OVERLAP_BUCKET = 2000  # elements: the tiny student spans many buckets, so reductions really interleave
LAYOUTS_2 = [(2, 1), (1, 2), (1, 1)]  # (TP, PP); DP = world / (TP x PP)
LAYOUTS_4 = [(2, 2), (2, 1), (1, 2)]


def _objects(name: str, tp: int, pp: int, init: dict | None, distributed_optimizer: bool = False,
             overlap: bool = False, sp: bool = False):
    """Student (wrapped), frozen teacher, optimizer, schedule of scenario ``name``; ``init`` None = seeded
    weights (the reference), else ``init``'s weights. Returns them and the seeded weights (gathered)."""
    from caopd_megatron.config.schema import OptimConfig
    from caopd_megatron.distill.optim import build_optimizer, build_scheduler
    from caopd_megatron.models.teacher import freeze
    from caopd_megatron.parallel.data_parallel import wrap_student
    from caopd_megatron.parallel.state import gather_full_state_dict, load_full_state_dict

    sc = {**SCENARIOS, **OVERLAP_ONLY}[name]
    student = _build(sc["student"], tp, pp, seed=1, sp=sp)
    teacher = freeze(_build(sc["teacher"], tp, pp, seed=2, sp=sp))
    seeded = {"student": gather_full_state_dict(student), "teacher": gather_full_state_dict(teacher)}
    if init is not None:
        # Seeded builds start from the single-process weights in every layout (builder's CPU initialisation).
        load_full_state_dict(student, init["init_student"])
        load_full_state_dict(teacher, init["init_teacher"])
    student = wrap_student(student, distributed_optimizer=distributed_optimizer, overlap_grad_reduce=overlap,
                           bucket_size=OVERLAP_BUCKET if overlap else None)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1)
    opt = build_optimizer(student, ocfg)
    return student, teacher, opt, build_scheduler(opt, ocfg, 10), seeded


def _distill(name: str, student, teacher, opt, sched):
    from caopd_megatron.config.schema import DistillConfig
    from caopd_megatron.distill.sft import SupervisedRows
    from caopd_megatron.distill.step import distill_step

    sc = {**SCENARIOS, **OVERLAP_ONLY}[name]
    examples = _examples()
    chosen = examples[1:1 + sc["replay"]]
    replay = SupervisedRows([e.teacher_prompt_ids for e in chosen], [e.response_ids for e in chosen], 0) if chosen else None
    cfg = DistillConfig(grad_clip=0.5, **sc["distill"])
    return distill_step(student, teacher, opt, sched, examples, cfg, 0, VOCAB, extra_loss=replay)


def _step(name: str, tp: int, pp: int, init: dict | None, distributed_optimizer: bool = False,
          steps: int = 1, overlap: bool = False, sp: bool = False) -> dict:
    """Scenario ``name`` under (tp, pp): one step (loss, norm, gradients, weights, EMA teacher) and, with
    ``steps=2``, a second one (``loss2``, ``grad_norm2``, ``weights2``: Adam's moments from step 1 matter).
    ``overlap``: overlapped DP gradient reduction; ``launched`` records, per step, how many bucket reductions
    the backward hooks had issued before the finaliser ran, and the number of buckets. ``sp``: sequence
    parallelism (training on TP-padded micro-batches, decoding with it switched off)."""
    import caopd_megatron.distill.step as step_module
    from caopd_megatron.models.teacher import ema_update
    from caopd_megatron.parallel.state import gather_full_state_dict
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    sc = {**SCENARIOS, **OVERLAP_ONLY}[name]
    student, teacher, opt, sched, seeded = _objects(name, tp, pp, init, distributed_optimizer, overlap, sp)
    launched, finish = [], step_module.finish_gradients
    if overlap:
        def finish_and_count(model):
            groups = model.bucket_groups
            launched.append((sum(g.grad_reduce_handle is not None for g in groups), len(groups)))
            finish(model)
        step_module.finish_gradients = finish_and_count
    out: dict = {}
    if init is None:
        out["init_student"], out["init_teacher"] = seeded["student"], seeded["teacher"]
    else:
        out["seeded_student"], out["seeded_teacher"] = seeded["student"], seeded["teacher"]
    if name in "AQ" and not distributed_optimizer and not overlap:
        # Decoding through the pipeline / TP shards: sampled and greedy, prompts of different lengths.
        # Two batches (3 + 2 prompts): under DP=2 each replica decodes one and the results are all-gathered.
        import caopd_megatron.rollout.sampler as sampler
        from caopd_megatron.parallel.data_parallel import data_parallel_rank, model_groups

        prompts = [e.student_prompt_ids for e in _examples()]
        decode, rows = sampler._generate_batch, []
        sampler._generate_batch = lambda model, batch, *a: rows.append(len(batch)) or decode(model, batch, *a)
        try:
            for temperature in (1.0, 0.0):
                gens = generate(student, prompts, SamplingParams(max_new_tokens=5, temperature=temperature, seed=7),
                                eos_id=3, real_vocab_size=VOCAB, batch_size=3)
                out[f"generate_t{temperature}"] = [(g.response_ids, g.logprobs) for g in gens]
            # One batch for two replicas: DP rank 1 decodes nothing and still joins the all-gather.
            gens = generate(student, prompts, SamplingParams(max_new_tokens=5, temperature=1.0, seed=7),
                            eos_id=3, real_vocab_size=VOCAB, batch_size=8)
            out["generate_one_batch"] = [(g.response_ids, g.logprobs) for g in gens]
        finally:
            sampler._generate_batch = decode
        out["decoded_rows"], out["dp_rank"] = rows, data_parallel_rank(model_groups(student))
    stats = _distill(name, student, teacher, opt, sched)
    out.update(loss=stats.loss, grad_norm=stats.grad_norm, tokens=stats.tokens, sequences=stats.sequences,
               weights=gather_full_state_dict(student))
    if not distributed_optimizer:  # with it, each DP rank holds the reduced gradient of its own range only
        out["grads"] = gather_full_state_dict(student, grads=True)
    if sc["ema"] is not None:
        ema_update(teacher, student, sc["ema"])
        out["ema_teacher"] = gather_full_state_dict(teacher)
    if steps == 2:
        stats = _distill(name, student, teacher, opt, sched)
        out.update(loss2=stats.loss, grad_norm2=stats.grad_norm, weights2=gather_full_state_dict(student))
    step_module.finish_gradients = finish
    out["launched"] = launched
    if distributed_optimizer:
        from megatron.core import parallel_state

        out["state_numel"] = (parallel_state.get_tensor_model_parallel_rank(), opt.local_state_numel(),
                              sum(p.numel() for p in student.parameters() if p.requires_grad))
    return out


def _resume(tp: int, pp: int, ref: dict, root: str) -> dict:
    """Scenario A with the distributed optimizer: step, save (per-rank files + distributed copy), step again;
    then fresh objects resume from the per-rank files, and others from the distributed copy, and take that
    second step. Returns the three second-step results."""
    from caopd_megatron.checkpointing.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from caopd_megatron.checkpointing.distributed_checkpoint import load_distributed
    from caopd_megatron.parallel.state import gather_full_state_dict

    def second_step(objs) -> dict:
        stats = _distill("A", *objs[:4])
        return {"loss": stats.loss, "grad_norm": stats.grad_norm, "weights": gather_full_state_dict(objs[0])}

    objs = _objects("A", tp, pp, ref, distributed_optimizer=True)
    _distill("A", *objs[:4])
    ckpt = save_checkpoint(root, 1, student=objs[0], optimizer=objs[2], scheduler=objs[3], teacher=objs[1],
                           state=TrainState(1, {}), config_yaml="", distributed=True)
    out = {"uninterrupted": second_step(objs)}
    objs = _objects("A", tp, pp, ref, distributed_optimizer=True)
    load_checkpoint(root, student=objs[0], optimizer=objs[2], scheduler=objs[3], teacher=objs[1])
    out["per_rank_files"] = second_step(objs)
    objs = _objects("A", tp, pp, ref, distributed_optimizer=True)
    load_distributed(ckpt / "dist", student=objs[0], teacher=objs[1], optimizer=objs[2], scheduler=objs[3])
    out["distributed_copy"] = second_step(objs)
    return out


def _resume_resharded(tp: int, pp: int, ref: dict, root: str) -> dict:
    """Resume ``_resume``'s DP=2 checkpoint under this (other) layout with the distributed optimizer: the
    layout differs, so ``load_checkpoint`` reads the distributed copy and megatron re-cuts the Adam state."""
    from caopd_megatron.checkpointing.checkpoint import load_checkpoint
    from caopd_megatron.parallel.state import gather_full_state_dict

    objs = _objects("A", tp, pp, ref, distributed_optimizer=True)
    load_checkpoint(root, student=objs[0], optimizer=objs[2], scheduler=objs[3], teacher=objs[1])
    stats = _distill("A", *objs[:4])
    return {"loss": stats.loss, "grad_norm": stats.grad_norm, "weights": gather_full_state_dict(objs[0])}


def _reference(rank: int, world: int) -> dict:
    _init_parallel(1, 1)
    return {name: _step(name, 1, 1, None, steps=2) for name in {**SCENARIOS, **OVERLAP_ONLY}}


def _layouts(rank: int, world: int, layouts: list, refs: dict, distopt: tuple = (), resume_root: str = "",
             reshard_root: str = "", overlap: tuple = (), sp: tuple = ()) -> dict:
    """Every scenario under each (tp, pp) of ``layouts``; the (tp, pp) in ``distopt`` also with megatron's
    distributed optimizer for two steps (keys ``("distopt", tp, pp, name)``) and, with ``resume_root``, the
    save/resume check (key ``("resume", tp, pp)``), with ``reshard_root`` the resume of that checkpoint
    under this layout (key ``("resharded", tp, pp)``); the (tp, pp) in ``overlap`` with overlapped gradient
    reduction for two steps, also with the distributed optimizer where in ``distopt`` (keys
    ``("overlap", tp, pp, name)``, ``("overlap", "distopt", tp, pp, name)``), scenario C included; the
    (tp, pp) in ``sp`` also with sequence parallelism (keys ``("sp", tp, pp, name)``)."""
    from megatron.core import parallel_state

    results = {}
    for tp, pp in layouts:
        _init_parallel(tp, pp)
        for name in SCENARIOS:
            r = _step(name, tp, pp, refs[name])
            r["dp"] = parallel_state.get_data_parallel_world_size()
            results[(tp, pp, name)] = r
        if (tp, pp) in sp:
            for kind, name in [("sp", "A"), ("sp", "B"), ("sp", "Q"), ("qk", "Q")]:
                r = _step(name, tp, pp, refs[name], sp=kind == "sp")
                r["dp"] = parallel_state.get_data_parallel_world_size()
                results[(kind, tp, pp, name)] = r
        if (tp, pp) in overlap:
            for name in [*SCENARIOS, "C"]:
                for sharded in ((False, True) if (tp, pp) in distopt else (False,)):
                    r = _step(name, tp, pp, refs[name], distributed_optimizer=sharded, steps=2, overlap=True)
                    r["dp"] = parallel_state.get_data_parallel_world_size()
                    results[("overlap", "distopt", tp, pp, name) if sharded else ("overlap", tp, pp, name)] = r
        if (tp, pp) not in distopt:
            continue
        for name in SCENARIOS:
            r = _step(name, tp, pp, refs[name], distributed_optimizer=True, steps=2)
            r["dp"] = parallel_state.get_data_parallel_world_size()
            results[("distopt", tp, pp, name)] = r
        if resume_root:
            results[("resume", tp, pp)] = _resume(tp, pp, refs["A"], resume_root)
        if reshard_root:
            results[("resharded", tp, pp)] = _resume_resharded(tp, pp, refs["A"], reshard_root)
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
    """Every layout run in ``results`` (plain and distributed-optimizer ones) against the reference."""
    for key, r in results.items():
        *kind, tp, pp, name = key
        ref = refs[name]
        label = " ".join([f"TP={tp} PP={pp} DP={r['dp']} scenario {name}", *kind])
        assert r["dp"] == world // (tp * pp)
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), label
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), label
        assert (r["tokens"], r["sequences"]) == (ref["tokens"], ref["sequences"]), label
        _close_dicts(r["seeded_student"], ref["init_student"], f"{label} seeded student init", atol=0.0)
        _close_dicts(r["seeded_teacher"], ref["init_teacher"], f"{label} seeded teacher init", atol=0.0)
        if "grads" in r:
            _close_dicts(r["grads"], ref["grads"], f"{label} grad")
        # Adam's first step is ~lr * g / (|g| + eps): for |g| near eps an fp32-rounding difference in g moves the
        # update by a visible fraction of lr, so weights are compared to 2e-3 of one step (lr = 1e-2). Measured:
        # an embedding gradient of -1.8e-8 under TP2xDP2 (scenario C) lands 1.2e-5 from the reference (the
        # same with and without overlapped reduction, which are bitwise equal to each other).
        _close_dicts(r["weights"], ref["weights"], f"{label} weight", atol=2e-5)
        if "loss2" in r:  # second step: Adam's moments of step 1 (sharded with the distributed optimizer) matter
            assert r["loss2"] == pytest.approx(ref["loss2"], rel=1e-5, abs=1e-6), label
            assert r["grad_norm2"] == pytest.approx(ref["grad_norm2"], rel=1e-5), label
            _close_dicts(r["weights2"], ref["weights2"], f"{label} weight after step 2", atol=2e-5)
        if "decoded_rows" in r:  # this replica decoded only its round-robin share, once per temperature
            share = [3, 2] if r["dp"] == 1 else [[3], [2]][r["dp_rank"]]
            one_batch = [5] if r["dp"] == 1 or r["dp_rank"] == 0 else []
            assert r["decoded_rows"] == share * 2 + one_batch, label
        for key in ("generate_t1.0", "generate_t0.0", "generate_one_batch"):
            if key in r:
                assert [g[0] for g in r[key]] == [g[0] for g in ref[key]], f"{label} {key} tokens"
                for (_, lp), (_, lp_ref) in zip(r[key], ref[key]):
                    assert lp == pytest.approx(lp_ref, rel=1e-4, abs=1e-5), f"{label} {key} logprobs"
        if "ema_teacher" in ref:
            _close_dicts(r["ema_teacher"], ref["ema_teacher"], f"{label} EMA teacher")


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("distopt_resume"))


@pytest.fixture(scope="module")
def two_process(references, resume_root) -> list[dict]:
    """One 2-process world: TP=2, PP=2, DP=2; DP=2 also with the distributed optimizer and its save/resume."""
    return run_distributed(_layouts, 2, LAYOUTS_2, references, ((1, 1),), resume_root, "", ((1, 1),), ((2, 1),))


@pytest.fixture(scope="module")
def four_process(references, two_process, resume_root) -> list[dict]:
    """One 4-process world: TP2xPP2, TP2xDP2, PP2xDP2; TP2xDP2 also with the distributed optimizer, and
    resuming the 2-process world's DP=2 checkpoint (so ``two_process`` runs first)."""
    return run_distributed(_layouts, 4, LAYOUTS_4, references, ((2, 1),), "", resume_root, ((2, 1), (1, 2)),
                           ((2, 2), (2, 1)))


@pytest.mark.slow
def test_reference_is_a_real_step(references) -> None:
    assert references["A"]["grad_norm"] > 0.5  # clipping (grad_clip=0.5) is exercised
    # Keyed sampling noise: one batch of 5 or batches of 3 + 2 give the same samples.
    ref = references["A"]
    assert [g[0] for g in ref["generate_one_batch"]] == [g[0] for g in ref["generate_t1.0"]]
    for name, ref in references.items():
        assert ref["loss"] > 0
        moved = max(float((ref["weights"][k] - ref["init_student"][k]).abs().max()) for k in ref["weights"])
        assert moved > 1e-3, name
        moved = max(float((ref["weights2"][k] - ref["weights"][k]).abs().max()) for k in ref["weights"])
        assert moved > 1e-3, name


def _plain(results: dict) -> dict:
    return {k: v for k, v in results.items() if k[0] not in ("distopt", "resume", "resharded", "overlap", "sp", "qk")}


@pytest.mark.slow
def test_two_process_layouts_tp2_pp2_dp2(two_process, references) -> None:
    results = [_plain(r) for r in two_process]
    # Every rank gathered the same replica; compare every rank's (the loss, weights and generations are the
    # same everywhere; the decoded share differs between DP ranks).
    for r in results:
        _check(r, references, 2)


@pytest.mark.slow
def test_four_process_layouts_tp2xpp2_tp2xdp2_pp2xdp2(four_process, references) -> None:
    results = [_plain(r) for r in four_process]
    for r in results:
        _check(r, references, 4)


def _distopt(results: dict) -> dict:
    return {k: v for k, v in results.items() if k[0] == "distopt"}


@pytest.mark.slow
def test_distributed_optimizer_dp2_and_tp2xdp2_take_the_single_process_steps(two_process, four_process,
                                                                            references) -> None:
    """Two steps with megatron's DistributedOptimizer (reduce-scatter, sharded AdamW, all-gather) under DP=2
    and TP=2 x DP=2 give the single-process losses, norms (clipped) and updated weights, both scenarios."""
    for world, results in ((2, two_process), (4, four_process)):
        assert len(_distopt(results[0])) == len(SCENARIOS)
        _check(_distopt(results[0]), references, world)
        for rank in range(1, world):
            for key, r in _distopt(results[rank]).items():
                assert (r["loss"], r["loss2"]) == (results[0][key]["loss"], results[0][key]["loss2"])
                _close_dicts(r["weights2"], results[0][key]["weights2"], f"rank {rank} {key}", atol=0.0)


@pytest.mark.slow
def test_overlapped_gradient_reduction_takes_the_single_process_steps(two_process, four_process,
                                                                     references) -> None:
    """``parallel.overlap_grad_reduce`` with 2,000-element buckets: two steps under DP=2 (all-reduce and
    distributed optimizer), TP=2 x DP=2 (both) and PP=2 x DP=2 equal the single-process steps. From the
    second step on the backward hooks issue every bucket's reduction before the finaliser runs (the first
    step is megatron's calibration pass), except in scenario C, where one replica has no replay micro-batch
    and every replica defers to the finaliser."""
    for world, results, n_runs in ((2, two_process, 6), (4, four_process, 9)):
        for rank_results in results:
            runs = {k: v for k, v in rank_results.items() if k[0] == "overlap"}
            assert len(runs) == n_runs
            _check(runs, references, world)
            for key, r in runs.items():
                (first, buckets), (second, buckets2) = r["launched"]
                # megatron buckets only the first pipeline stage (later stages reduce in one bucket).
                assert buckets == buckets2 >= (1 if key[-2] > 1 else 2), key
                assert first == 0, key
                assert second == (0 if key[-1] == "C" else buckets), key


@pytest.mark.slow
def test_sequence_parallel_tp2_tp2xpp2_tp2xdp2(two_process, four_process, references) -> None:
    """``parallel.sequence_parallel`` under TP=2, TP=2 x PP=2 and TP=2 x DP=2: one step (micro-batch lengths
    padded to a multiple of TP, fused loss on hidden states gathered from the sequence-parallel region, layer
    norm gradients all-reduced over TP by the finaliser) and decoding (sequence parallelism switched off)
    equal the single-process run, in scenarios A, B and Q (QK norms); Q also without SP (the QK norms'
    gradients are summed over TP, so the two ranks' copies stay equal to the single-process weights)."""
    for world, results, n_runs in ((2, two_process, 4), (4, four_process, 8)):
        for rank_results in results:
            runs = {k: v for k, v in rank_results.items() if k[0] in ("sp", "qk")}
            assert len(runs) == n_runs
            _check(runs, references, world)
            assert all("generate_t1.0" in r for k, r in runs.items() if k[-1] in "AQ")


@pytest.mark.slow
def test_distributed_optimizer_shards_adam_state_over_dp(two_process, four_process) -> None:
    """Each DP rank holds about 1/DP of its model shard's optimizer state; the DP ranks' parts add up to it."""
    for world, dp, results in ((2, 2, two_process), (4, 2, four_process)):
        for name in SCENARIOS:
            per_tp: dict[int, list] = {}
            for rank_results in results:
                (key,) = [k for k in _distopt(rank_results) if k[-1] == name]
                tp_rank, numel, total = rank_results[key]["state_numel"]
                per_tp.setdefault(tp_rank, []).append((numel, total))
            for tp_rank, parts in per_tp.items():
                assert len(parts) == dp, (world, name, tp_rank)
                total = parts[0][1]
                assert sum(n for n, _ in parts) == total, (world, name, tp_rank, parts)
                for n, _ in parts:
                    assert abs(n - total / dp) <= 0.05 * total, (world, name, tp_rank, parts)


@pytest.mark.slow
def test_distributed_optimizer_resume_takes_the_uninterrupted_step(two_process) -> None:
    """DP=2 with the distributed optimizer: after a save, a fresh run resumed from the per-rank files and one
    resumed from the distributed copy take exactly the second step of the uninterrupted run."""
    for results in two_process:
        r = results[("resume", 1, 1)]
        want = r["uninterrupted"]
        for source in ("per_rank_files", "distributed_copy"):
            got = r[source]
            assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"]), source
            _close_dicts(got["weights"], want["weights"], source, atol=0.0)
            assert any(not torch.equal(got["weights"][k], two_process[0][("distopt", 1, 1, "A")]["weights"][k])
                       for k in got["weights"]), "the second step moved the weights"


@pytest.mark.slow
def test_distributed_optimizer_checkpoint_resumes_under_tp2xdp2(two_process, four_process) -> None:
    """The DP=2 checkpoint resumed under TP=2 x DP=2 (per-rank files do not fit: the distributed copy is read,
    Adam state re-cut by megatron's ``fully_reshardable`` format) takes the uninterrupted run's second step."""
    want = two_process[0][("resume", 1, 1)]["uninterrupted"]
    for results in four_process:
        got = results[("resharded", 2, 1)]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        _close_dicts(got["weights"], want["weights"], "resharded resume", atol=1e-5)


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


def test_bad_bucket_size_names_the_setting() -> None:
    from caopd_megatron.parallel.data_parallel import wrap_student

    with pytest.raises(ValueError, match="parallel.ddp_bucket_size must be a positive number of elements, got 0"):
        wrap_student(torch.nn.Linear(2, 2), overlap_grad_reduce=True, bucket_size=0)


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
