"""The embedded default under ``parallel.tensor_model_parallel_size=2`` (also with sequence parallelism),
``parallel.pipeline_model_parallel_size=2`` and plain data parallelism, with the all-reduce + AdamW (also overlapped with the backward) or with megatron's
distributed optimizer (two CPU
processes under torchrun, gloo) reproduces the single-process run: same
per-question evaluation responses for base / OPD / CaOPD, same metrics, same training-loss trajectory (fp32
tolerance).

Reduced sizes as in ``test_cli_e2e``; what makes the runs comparable is that a seeded build starts from the
single-process weights in every layout (``models/builder.py``), sampling does not depend on vocabulary
padding (``rollout/sampler.py``), and every step is the single-process step (``tests/test_parallel_layouts``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_harness import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
        "task.n_train=64", "task.n_eval=40", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "logging.progress=false", "logging.level=WARNING", "run.threads=1", "warmup.steps=15",
        "warmup.batch_size=32", "distill.steps=3", "distill.micro_batch_size=8"]


def _demo(out: Path, nproc: int, *overrides: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "caopd_megatron.cli.main"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "caopd_megatron.cli.main"]
    proc = subprocess.run([*cmd, "demo", *TINY, f"run.output_dir={out}", *overrides], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"demo {overrides} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


# summary.json metrics are means over the same 40 questions; the layouts' arithmetic differs only in fp32
# reduction order, which moves a metric by far less than this (one question moves accuracy by 0.025).
METRIC_ABS_TOL = 1e-9


def assert_nested_close(got, want, abs_tol: float, where: str) -> None:
    """``got == want`` for nested dicts/lists of JSON values, numbers compared within ``abs_tol``
    (``pytest.approx`` compares only flat mappings and sequences)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_nested_close(got[key], want[key], abs_tol, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_nested_close(g, w, abs_tol, f"{where}[{i}]")
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - want) <= abs_tol, \
            f"{where}: {got!r} != {want!r} (abs tolerance {abs_tol})"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_nested_comparison_sees_a_difference_at_any_depth() -> None:
    want = {"a": 0.5, "bins": [{"n": 3, "acc": 0.25}, {"n": 0, "acc": None}], "name": "x"}
    assert_nested_close({"a": 0.5 + 1e-12, "bins": [{"n": 3, "acc": 0.25}, {"n": 0, "acc": None}], "name": "x"},
                        want, 1e-9, "s")
    for bad in ({**want, "a": 0.5 + 1e-6}, {**want, "bins": [{"n": 3, "acc": 0.26}, {"n": 0, "acc": None}]},
                {**want, "bins": [{"n": 3, "acc": 0.25}, {"n": 0, "acc": 0.0}]}, {**want, "bins": want["bins"][:1]},
                {**want, "name": "y"}, {k: v for k, v in want.items() if k != "a"}):
        with pytest.raises(AssertionError):
            assert_nested_close(bad, want, 1e-9, "s")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "demo"
    _demo(out, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("override", ["parallel.tensor_model_parallel_size=2",
                                      "parallel.tensor_model_parallel_size=2 parallel.sequence_parallel=true",
                                      "parallel.pipeline_model_parallel_size=2",
                                      "parallel.backend=gloo",  # no TP/PP: DP=2 (warm-up and steps DP-split)
                                      # DP=2 with megatron's distributed optimizer (warm-up's and training's)
                                      "parallel.backend=gloo parallel.use_distributed_optimizer=true",
                                      # DP=2, reductions overlapped with the backward, many small buckets
                                      "parallel.backend=gloo parallel.overlap_grad_reduce=true "
                                      "parallel.ddp_bucket_size=4000"])
def test_demo_under_two_process_layout_matches_single_process(single: Path, tmp_path: Path, override: str) -> None:
    out = tmp_path / "demo"
    _demo(out, 2, *override.split())
    want, got = json.loads((single / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert set(got) == set(want)
    for name in ("base", "OPD", "CaOPD"):
        assert set(got[name]) == set(want[name])
        for key, value in want[name].items():
            assert_nested_close(got[name][key], value, METRIC_ABS_TOL, f"{override}: {name} {key}")
    assert got["accuracy_by_digits"] == want["accuracy_by_digits"]
    for name in ("base", "opd", "caopd"):
        # Greedy answers and stated confidences, question by question.
        assert _lines(out / "eval" / f"{name}_responses.jsonl") == _lines(single / "eval" / f"{name}_responses.jsonl")
    for name in ("opd", "caopd"):
        ref, log = _lines(single / name / "train_log.jsonl"), _lines(out / name / "train_log.jsonl")
        assert [e["step"] for e in log] == [0, 1, 2]  # one writer: no duplicated entries from other ranks
        for a, b in zip(log, ref):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            for key in ("accuracy", "stated_confidence", "empirical_confidence", "lr"):
                assert a[key] == b[key], f"{override}: {name} step {a['step']} {key}"
