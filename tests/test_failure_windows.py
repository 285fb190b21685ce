"""Killed jobs, diverged jobs, orphaned helpers: real `caopd run` jobs in subprocesses, at reduced size.

Reference: one uninterrupted job of the same config. Every job killed at a named point of a save or of the
run loop (``CAOPD_KILL_AT``, an ``os._exit`` as abrupt as ``kill -9``) and then resumed must end with the
reference's log: each step exactly once, the same losses bit for bit, and a complete latest checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from caopd_megatron.checkpointing.format import latest_checkpoint, read_meta, verify_files
from caopd_megatron.runtime.fault_injection import KILL_ENV, KILLED_STATUS
from test_cli_e2e import ROOT, TINY, clean_env, read_jsonl

pytestmark = pytest.mark.slow
BASE = [*TINY, "distill.steps=3", "checkpoint.save_interval=1", "checkpoint.keep_last=1", "teacher.mode=ema"]
TAG_ENV = "CAOPD_TEST_JOB_TAG"


def run_job(out: Path, *args: str, kill: str | None = None, tag: str | None = None) -> subprocess.CompletedProcess:
    env = clean_env(PYTHONPATH=str(ROOT), **({KILL_ENV: kill} if kill else {}), **({TAG_ENV: tag} if tag else {}))
    return subprocess.run([sys.executable, "-m", "caopd_megatron.cli.main", "run", *BASE, *args,
                           f"run.output_dir={out}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The uninterrupted job. Its 4th save would be a repeat of step 3 (the old final re-save): reaching it
    kills the job, so exit status 0 proves no step is saved twice."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_job(out, kill="save:rank_files_written@4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_jsonl(out / "train_log.jsonl")
    assert [e["step"] for e in log] == [0, 1, 2]
    return log


@pytest.mark.parametrize("point", [
    "save:rank_files_written@1",  # inside the first save: no complete checkpoint yet, the log already has step 0
    "save:installed@2",  # step_2 in place, `latest` still names step_1 (keep_last=1: step_1 not yet pruned)
    "save:latest_updated@2",  # `latest` names step_2, step_1 not yet pruned
    "run:log_written@3",  # the log holds step 2, its checkpoint (step_3) was never begun
])
def test_killed_job_resumes_with_each_step_once(point, reference, tmp_path):
    killed = run_job(tmp_path, kill=point)
    assert killed.returncode == KILLED_STATUS, killed.stderr[-3000:]
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.12')  # and a torn append, as a kill inside the write leaves it
    resumed = run_job(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert [e["step"] for e in log] == [0, 1, 2]
    assert [e["loss"] for e in log] == [e["loss"] for e in reference]
    assert [e["grad_norm"] for e in log] == [e["grad_norm"] for e in reference]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_000003"
    verify_files(latest, read_meta(latest), ["rank_00000.pt"])
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_000003"]  # keep_last=1, and no temp/aside debris left


def _tagged_processes(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{TAG_ENV}={tag}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_megatron_writer_helper_does_not_outlive_a_killed_job(tmp_path):
    tag = uuid.uuid4().hex
    proc = run_job(tmp_path, "checkpoint.distributed=true", kill="save:latest_updated@1", tag=tag)
    assert proc.returncode == KILLED_STATUS, proc.stderr[-3000:]
    assert (latest_checkpoint(tmp_path) / "dist" / ".metadata").is_file()  # the helper did write
    deadline = time.time() + 10
    while _tagged_processes(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert _tagged_processes(tag) == []


def test_fp16_with_a_huge_lr_stops_at_the_first_non_finite_step(tmp_path):
    """Reproduces NaN in fp16: the job exits 4 (runtime/exit_codes.py) naming the step, writes no non-finite checkpoint or log value,
    and keeps the checkpoint it had."""
    proc = run_job(tmp_path, "model.params_dtype=float16", "optim.lr=1e4", "optim.warmup_steps=0")
    assert proc.returncode == 4, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("caopd run: error: training diverged at step 1: non-finite"), last
    assert "Traceback" not in proc.stderr
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_000001"
    verify_files(latest, read_meta(latest), ["rank_00000.pt"])
    payload = torch.load(latest / "rank_00000.pt", map_location="cpu", weights_only=True)
    for part in ("student", "teacher"):
        for name, t in payload[part].items():
            assert not isinstance(t, torch.Tensor) or not t.is_floating_point() or bool(torch.isfinite(t).all())
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_000001"]


def test_refuse_mode_leaves_an_existing_run_alone(tmp_path):
    (tmp_path / "train_log.jsonl").write_text('{"step": 0}\n')
    proc = run_job(tmp_path, "run.existing=refuse")
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["train_log.jsonl"]
