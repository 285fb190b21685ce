"""`caopd demo` stopped by Ctrl-C (SIGINT) or SIGTERM, in a real subprocess that receives the signal.

References: an uninterrupted demo of the same configuration (the files of the stages that finished before the
signal must equal its files: warm-up log, base evaluation, base student weights, compared exactly), and
what an interrupted demo must leave: exit 75, one line on stderr naming the signal, the stage and the kept
files, no traceback, nothing of the interrupted stage or after it (no summary, no OPD log or student).
The uninterrupted demo is the rerun that completes the warm-up-interrupted one (same command, same directory,
which the interruption left empty): one demo fewer than a separate reference run.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from caopd_megatron.runtime.exit_codes import EXIT_INTERRUPTED
from test_cli_e2e import ROOT, TINY, clean_env

pytestmark = pytest.mark.slow

DEMO = [*TINY, "logging.level=INFO", "logging.log_interval=1", "warmup.steps=15", "warmup.batch_size=32"]


def start_demo(run: Path, *overrides: str, stderr: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "caopd_megatron.cli.main", "demo", *DEMO, *overrides,
                             f"run.output_dir={run}"], stdout=subprocess.DEVNULL, stderr=open(stderr, "w"),
                            env=clean_env(PYTHONPATH=str(ROOT)), cwd=ROOT)


def signal_when_logged(proc: subprocess.Popen, stderr: Path, text: str, sig: signal.Signals) -> tuple[int, str]:
    """Send ``sig`` once ``text`` appears on the demo's stderr; returns its exit code and stderr."""
    deadline = time.monotonic() + 600
    while text not in stderr.read_text():
        assert proc.poll() is None, f"the demo ended before {text!r}:\n{stderr.read_text()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=600), stderr.read_text()


def student_weights(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved student (a torch.distributed.checkpoint folder), read by torch's own converter."""
    dcp_to_torch_save(folder, scratch)
    state = torch.load(scratch, weights_only=False)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)

    walk("", state)
    return flat


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def warmup_sigterm(tmp_path_factory) -> dict:
    """SIGTERM in a demo's warm-up, then the same command rerun in the same directory to the end: what the
    signalled run returned and left, and the rerun's exit code and directory (the uninterrupted reference)."""
    run = tmp_path_factory.mktemp("warmup_sigterm") / "demo"
    err, rerun_err = run.parent / "stderr.txt", run.parent / "rerun_stderr.txt"
    proc = start_demo(run, "warmup.steps=5000", "distill.steps=2", stderr=err)
    code, stderr = signal_when_logged(proc, err, "student: ", signal.SIGTERM)
    left = [name for name in ("warmup_log.jsonl", "eval", "base", "summary.json", "caopd.lock") if (run / name).exists()]
    again = start_demo(run, "warmup.steps=15", "distill.steps=2", stderr=rerun_err)
    return dict(run=run, code=code, stderr=stderr, left=left, rerun_code=again.wait(timeout=900),
                rerun_stderr=rerun_err.read_text())


@pytest.fixture(scope="module")
def uninterrupted(warmup_sigterm) -> Path:
    assert warmup_sigterm["rerun_code"] == 0, warmup_sigterm["rerun_stderr"][-3000:]
    return warmup_sigterm["run"]


def test_ctrl_c_during_opd_keeps_the_finished_stages(uninterrupted, tmp_path):
    """Ctrl-C in OPD's distillation: warm-up and base stay, equal to an uninterrupted demo's; OPD writes nothing."""
    run, err = tmp_path / "demo", tmp_path / "stderr.txt"
    proc = start_demo(run, "distill.steps=400", stderr=err)
    code, stderr = signal_when_logged(proc, err, "OPD distill step 1:", signal.SIGINT)
    assert code == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    line = last_line(stderr)
    assert line.startswith("caopd demo: SIGINT received during OPD distillation: stopped at a step boundary")
    assert f"kept in {run}: warmup_log.jsonl, eval/base_*, base/student;" in line and "caopd demo" in line
    for name in ("warmup_log.jsonl", "eval/base_metrics.json", "eval/base_responses.jsonl"):
        assert (run / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    ours = student_weights(run / "base" / "student", tmp_path / "ours.pt")
    reference = student_weights(uninterrupted / "base" / "student", tmp_path / "reference.pt")
    assert ours.keys() == reference.keys() and ours
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    # Nothing of the interrupted stage or after it; no temporary folder left behind.
    assert not (run / "opd").exists() and not (run / "caopd").exists() and not (run / "summary.json").exists()
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["base_metrics.json", "base_responses.jsonl"]
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not (run / "caopd.lock").exists()


def test_sigterm_during_warmup_keeps_nothing_and_a_rerun_completes(warmup_sigterm):
    """SIGTERM in the warm-up: nothing of the demo's outputs is written, the lock is released, and rerunning
    the same command in the same directory completes."""
    run, code, stderr = warmup_sigterm["run"], warmup_sigterm["code"], warmup_sigterm["stderr"]
    assert code == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert last_line(stderr).startswith(f"caopd demo: SIGTERM received during warm-up: stopped at a step boundary; "
                                        f"kept in {run}: nothing;")
    assert warmup_sigterm["left"] == []  # no warm-up log, eval, base student, summary or lock
    assert warmup_sigterm["rerun_code"] == 0, warmup_sigterm["rerun_stderr"][-3000:]
    assert json.loads((run / "summary.json").read_text()).keys() >= {"base", "OPD", "CaOPD"}
