"""Checkpoints written under TP=2 and under PP=2 (megatron-core distributed checkpointing) load under TP=1 PP=1.

One 2-process world trains one distillation step under TP=2, saves, re-initialises megatron as PP=2, trains
and saves again; each time it gathers the student, the teacher (another size) and the Adam moments to global
names. A 1-process world then loads each checkpoint into freshly built (differently seeded) objects and
checks: weights and moments equal the gathered ones exactly; the loaded student's logits equal those of a
single-process model given the gathered weights; scheduler and metadata round-trip. The vocabulary is padded
to 64 rows under TP=2 and 48 under TP=1 (``make_vocab_size_divisible_by=16``), so the re-cut of
vocabulary-parallel tensors (weights and moments) is exercised. The torch-dist writer starts a helper process
on a process's first save, which dominates the runtime here.
"""
from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed

from parallel_helpers import STUDENT, TEACHER_B, VOCAB, build, examples, init_parallel

CK_STUDENT = {**STUDENT, "make_vocab_size_divisible_by": 16}
CK_TEACHER = {**TEACHER_B, "make_vocab_size_divisible_by": 16}
LAYOUTS = [(2, 1), (1, 2)]


def _objects(tp: int, pp: int, seed: int):
    from caopd_megatron.config.schema import OptimConfig
    from caopd_megatron.distill.optim import build_optimizer, build_scheduler
    from caopd_megatron.models.teacher import freeze
    from caopd_megatron.parallel.data_parallel import wrap_student

    student = wrap_student(build(CK_STUDENT, tp, pp, seed))
    teacher = freeze(build(CK_TEACHER, tp, pp, seed + 1))
    ocfg = OptimConfig(lr=1e-2, warmup_steps=2, schedule="constant")
    opt = build_optimizer(student.parameters(), ocfg)
    return student, teacher, opt, build_scheduler(opt, ocfg, 10)


def _snapshot(student, teacher, opt) -> dict:
    from caopd_megatron.parallel.state import gather_full_state_dict

    return {"student": gather_full_state_dict(student), "teacher": gather_full_state_dict(teacher),
            "exp_avg": gather_full_state_dict(student, value_fn=lambda p: opt.state[p]["exp_avg"]),
            "exp_avg_sq": gather_full_state_dict(student, value_fn=lambda p: opt.state[p]["exp_avg_sq"])}


def _train_and_save(rank: int, world: int, root: str) -> dict:
    from caopd_megatron.checkpointing.distributed_checkpoint import save_distributed
    from caopd_megatron.config.schema import DistillConfig
    from caopd_megatron.distill.step import distill_step

    out = {}
    for tp, pp in LAYOUTS:
        init_parallel(tp, pp)
        student, teacher, opt, sched = _objects(tp, pp, seed=1)
        distill_step(student, teacher, opt, sched, examples(), DistillConfig(micro_batch_size=2), 0, VOCAB)
        path = f"{root}/tp{tp}_pp{pp}"
        save_distributed(path, student=student, teacher=teacher, optimizer=opt, scheduler=sched,
                         metadata={"step": 1, "layout": [tp, pp]})
        out[path] = _snapshot(student, teacher, opt)
    return out


def _logits(model) -> torch.Tensor:
    tokens = torch.tensor([[5, 9, 13, 21, 34, 8, 39], [7, 7, 30, 2, 11, 17, 26]])
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand(2, -1)
    model.eval()
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None)[..., :VOCAB]


def _load_single(rank: int, world: int, saved: dict) -> list[str]:
    from caopd_megatron.checkpointing.distributed_checkpoint import load_distributed
    from caopd_megatron.parallel.state import load_full_state_dict

    init_parallel(1, 1)
    checked = []
    for path, ref in saved.items():
        student, teacher, opt, sched = _objects(1, 1, seed=50)  # other weights than the saved ones
        meta = load_distributed(path, student=student, teacher=teacher, optimizer=opt, scheduler=sched)
        assert meta["step"] == 1 and sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(1e-2)
        got = _snapshot(student, teacher, opt)
        for part in ("student", "teacher", "exp_avg", "exp_avg_sq"):
            assert set(got[part]) == set(ref[part]), (path, part)
            for name, want in ref[part].items():
                rows = VOCAB if name.endswith(("word_embeddings.weight", "output_layer.weight")) else None
                g, w = (got[part][name][:rows], want[:rows]) if rows else (got[part][name], want)
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{path} {part} {name}: {m}")
        reference, *_ = _objects(1, 1, seed=70)
        load_full_state_dict(reference, ref["student"])
        torch.testing.assert_close(_logits(student), _logits(reference), rtol=1e-5, atol=1e-6)
        # One optimizer step was taken before saving: the shared Adam step count comes back on every parameter.
        assert all(float(opt.state[p]["step"]) == 1.0 for p in student.parameters())
        checked.append(path)
    return checked


@pytest.mark.slow
def test_tp2_and_pp2_checkpoints_load_single_process(tmp_path) -> None:
    (saved, _) = run_distributed(_train_and_save, 2, str(tmp_path))
    assert len(saved) == 2
    (checked,) = run_distributed(_load_single, 1, saved)
    assert checked == sorted(saved, key=list(saved).index)


def test_not_a_checkpoint_is_a_clear_error(tmp_path) -> None:
    from caopd_megatron.checkpointing.distributed_checkpoint import DistributedCheckpointError, load_distributed

    with pytest.raises(DistributedCheckpointError, match="not a megatron-core distributed checkpoint"):
        load_distributed(tmp_path, student=None)


def _caopd(out, nproc: int, *args: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dist_harness import free_port

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    tiny = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
            "task.n_train=64", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "logging.progress=false",
            "logging.level=WARNING", "run.threads=1", "distill.steps=4", "distill.micro_batch_size=8",
            "teacher.mode=ema", f"run.output_dir={out}"]
    proc = subprocess.run([*launcher, "-m", "caopd_megatron.cli.main", "run", *tiny, *args], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, f"caopd run {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_run_saved_under_pp2_resumes_single_process_on_the_same_trajectory(tmp_path) -> None:
    """`caopd run` under PP=2 with checkpoint.distributed=true stops after 2 of 4 steps; a 1-process job
    resumes from that checkpoint (resharded: student, EMA teacher, Adam moments, LR schedule, data position)
    and its 4-step log matches an uninterrupted 1-process run."""
    import json

    _caopd(tmp_path / "single", 1)
    _caopd(tmp_path / "moved", 2, "parallel.pipeline_model_parallel_size=2", "run.max_steps_per_job=2",
           "checkpoint.distributed=true")
    _caopd(tmp_path / "moved", 1)

    def log(run: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines() if x.strip()]

    want, got = log("single"), log("moved")
    assert [e["step"] for e in got] == [0, 1, 2, 3]
    for a, b in zip(got, want):
        # KL losses here are ~1e-5: compare absolutely (fp32 rounding of a small difference of logs).
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        for key in ("lr", "accuracy", "stated_confidence", "empirical_confidence"):
            assert a[key] == b[key], (a["step"], key)
