"""End to end through the `caopd` command, in subprocesses, at reduced size.

References: the phase files are checked against what the phases must mean (p = correct/K recomputed from
the graded rows, rewritten confidences equal p, the answer text kept), the demo's metrics against a
recomputation from its per-question responses, and a resumed run's loss trajectory against an
uninterrupted run of the same job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from caopd_megatron.data.confidence import format_confidence, parse_confidence

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
        "task.n_train=64", "task.n_eval=40", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "logging.progress=false", "logging.level=WARNING", "run.threads=1"]


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID")


def clean_env(**extra: str) -> dict:
    """This process's environment without launcher variables: each `caopd` child is a single-process job."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, **extra}


def caopd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = clean_env(PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "caopd_megatron.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"caopd {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_demo_end_to_end_reduced(tiny_demo) -> None:
    out, proc = tiny_demo.out, tiny_demo.proc
    for name in ("base", "OPD", "CaOPD"):
        assert name in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"base", "OPD", "CaOPD", "accuracy_by_digits"}
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    for name in ("base", "opd", "caopd"):
        rows = read_jsonl(out / "eval" / f"{name}_responses.jsonl")
        assert len(rows) == 40
        metrics = json.loads((out / "eval" / f"{name}_metrics.json").read_text())
        acc = sum(r["correct"] for r in rows) / len(rows)
        conf = [parse_confidence(r["text"]) or 0.0 for r in rows]
        assert metrics["accuracy"] == pytest.approx(acc)
        assert metrics["ocg"] == pytest.approx(sum(conf) / len(conf) - acc)
        # Each training log has one entry per step.
    for name in ("opd", "caopd"):
        assert [e["step"] for e in read_jsonl(out / name / "train_log.jsonl")] == [0, 1, 2]


@pytest.mark.slow
def test_phases_through_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*TINY, f"run.output_dir={run}", "teacher.mode=frozen"]
    caopd("rollout", "--step", "0", "--out", str(tmp_path / "r.jsonl"), *common)
    rollouts = read_jsonl(tmp_path / "r.jsonl")
    assert len(rollouts) == 4 * 4
    assert all(r["logprobs"] and len(r["logprobs"]) == len(r["response_ids"]) for r in rollouts)

    caopd("rewrite", "--rollouts", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "x.jsonl"), *common)
    revised = read_jsonl(tmp_path / "x.jsonl")
    by_prompt = defaultdict(list)
    for e in revised:
        by_prompt[e["prompt_id"]].append(e["correct"])
    for e, r in zip(revised, rollouts):
        p = sum(by_prompt[e["prompt_id"]]) / len(by_prompt[e["prompt_id"]])
        assert e["empirical_confidence"] == pytest.approx(p)
        assert e["text"].endswith(f"Confidence: {format_confidence(p, 1)}")
        answer = r["text"].split("Confidence:")[0].strip()
        assert e["text"].startswith(answer)

    caopd("distill", "--examples", str(tmp_path / "x.jsonl"), *common)
    caopd("distill", "--examples", str(tmp_path / "x.jsonl"), *common)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith("step_000002"), latest
    caopd("evaluate", "--name", "final", *common)
    metrics = json.loads((run / "eval" / "final_metrics.json").read_text())
    assert metrics["n"] == 40


@pytest.mark.slow
def test_resume_continues_the_same_trajectory(tmp_path: Path) -> None:
    base = [*TINY, "distill.steps=4", "checkpoint.save_interval=1", "teacher.mode=ema"]
    caopd("run", *base, f"run.output_dir={tmp_path / 'straight'}")
    caopd("run", *base, "run.max_steps_per_job=2", f"run.output_dir={tmp_path / 'resumed'}")
    caopd("run", *base, f"run.output_dir={tmp_path / 'resumed'}")
    straight = read_jsonl(tmp_path / "straight" / "train_log.jsonl")
    resumed = read_jsonl(tmp_path / "resumed" / "train_log.jsonl")
    assert [e["step"] for e in resumed] == [0, 1, 2, 3]
    assert [e["loss"] for e in resumed] == [e["loss"] for e in straight]
    assert [e["accuracy"] for e in resumed] == [e["accuracy"] for e in straight]
    assert [e["confidence_student_entropy"] for e in resumed] == [e["confidence_student_entropy"] for e in straight]
    assert (tmp_path / "resumed" / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, needle", [
    (["model.hiden_size=3"], "unknown key 'model.hiden_size'"),
    (["distill.loss=l2"], "distill.loss"),
    (["distill.loss=mixed", "distill.mix_weight=1.5"], "distill.mix_weight must be in [0, 1]"),
    (["parallel.tensor_model_parallel_size=3"], "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (["data.train_prompts=/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl"),
])
def test_user_errors_are_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = caopd("run", *TINY, f"run.output_dir={tmp_path}", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_broken_transformer_engine_is_explained(tmp_path: Path) -> None:
    """An installed TE that cannot load CUDA makes `import megatron.core` raise RuntimeError: we say what to do."""
    fake = tmp_path / "site" / "transformer_engine"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("Could not load libcudart.so.12")\n')
    env = clean_env(PYTHONPATH=f"{fake.parent}{os.pathsep}{ROOT}")
    proc = subprocess.run([sys.executable, "-m", "caopd_megatron.cli.main", "run", f"run.output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "Transformer Engine cannot load its CUDA libraries" in proc.stderr
    assert "pip uninstall" in proc.stderr and "Traceback" not in proc.stderr


def test_phases_follow_the_checkpoint_and_stop_when_complete(tmp_path: Path) -> None:
    """The phase loop is driven by the checkpoint: a --step behind it is refused (it would reuse the step's
    rollout seeds), phases default to the checkpoint's step and files, the distill phase logs its step, a
    complete run gives exit 3 to phases and exit 0 to `run` without saving its last step again."""
    run = tmp_path / "run"
    common = [*TINY, "distill.steps=2", "checkpoint.save_interval=1", f"run.output_dir={run}"]
    caopd("run", *common, "run.max_steps_per_job=1")
    behind = caopd("rollout", "--step", "0", *common, check=False)
    assert behind.returncode == 2 and "--step 0, but the checkpoint" in behind.stderr and "at step 1" in behind.stderr
    caopd("rollout", *common)
    assert (run / "phases" / "step_000001.rollouts.jsonl").is_file()
    caopd("rewrite", *common, "parallel.tensor_model_parallel_size=3")  # one task, whatever the layout
    caopd("distill", *common)
    assert [e["step"] for e in read_jsonl(run / "train_log.jsonl")] == [0, 1]
    saves_before = sorted((run / "logs").glob("*.log"))
    done = caopd("rollout", *common, check=False)
    assert done.returncode == 3 and "training is complete" in done.stderr
    caopd("run", *common, "logging.level=INFO")
    newest = "".join(p.read_text() for p in set((run / "logs").glob("*.log")) - set(saves_before))
    assert "nothing to do" in newest and "saved checkpoint" not in newest
