"""The process groups are passed down explicitly: a TP=2 training step never falls back to megatron's globals.

megatron-core warns ("tp_group is None, using default tp group. Passing tp_group will be mandatory soon",
on global rank 0) wherever a layer, mapping or loss is handed no group and reads the global one. Reference:
that warning itself, recorded with ``warnings.catch_warnings(record=True)`` in each rank, over one full
on-policy step of the CLI's path (session, models, DDP wrap decision, rollout through the sampler, revision,
distillation step with replay, clipping, optimizer, EMA teacher) at TP=2 with 2 gloo processes.
"""
from __future__ import annotations

import pytest

from dist_harness import run_distributed
from test_cli_e2e import TINY


def _tp2_train_step(rank: int, world: int, run_dir: str) -> dict:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from caopd_megatron.config.loader import load_config
        from caopd_megatron.pipeline.session import build_student, build_teacher, open_session, train_prompts
        from caopd_megatron.pipeline.train import Trainer

        cfg = load_config((), [*TINY, "parallel.tensor_model_parallel_size=2", "rollout.prompts_per_step=2",
                                 "rollout.samples_per_prompt=2", "teacher.mode=ema", "teacher.replay_fraction=0.5",
                                 "distill.fused=true", f"run.output_dir={run_dir}"])
        session = open_session(cfg)
        student = build_student(session)
        teacher = build_teacher(session, student)
        trainer = Trainer(cfg, student, teacher, session.tokenizer, session.vocab.real, train_prompts(session),
                          session.run_dir)
        entry = trainer.train_step()
    fallbacks = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "tp_group is None" in str(w.message)]
    return {"fallbacks": fallbacks, "loss": entry.loss, "grad_norm": entry.grad_norm}


@pytest.mark.slow
def test_tp2_step_passes_every_group_explicitly(tmp_path) -> None:
    r0, r1 = run_distributed(_tp2_train_step, 2, str(tmp_path))
    assert r0["loss"] > 0 and r0["grad_norm"] > 0  # a real step ran
    assert (r0["loss"], r0["grad_norm"]) == (r1["loss"], r1["grad_norm"])
    # megatron warns on global rank 0 only; rank 1 is checked too in case that ever changes.
    assert r0["fallbacks"] == [] and r1["fallbacks"] == [], (r0["fallbacks"][:3], r1["fallbacks"][:3])
