"""Stop requests, the run-directory lock and the Slurm rendezvous, without a scheduler.

References: signals delivered to this very process (os.kill), a hand-computed time budget on a fake clock,
two gloo ranks of which only one is signalled, real processes (alive, dead, or a pid with another start
time) as lock owners, and hand-expanded Slurm host lists (``test_slurm.py`` also checks against scontrol).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from caopd_megatron.config.loader import ConfigError
from caopd_megatron.runtime import run_lock
from caopd_megatron.runtime.distributed import derived_port, expand_nodelist, slurm_rendezvous
from caopd_megatron.runtime.exit_codes import StopRequested
from caopd_megatron.runtime.preemption import NO_STOP, TIME_BUDGET, StopGuard, describe_stop, parse_signal
from caopd_megatron.runtime.run_lock import LOCK_NAME, LockOwner, RunLockedError, acquire_run_lock, try_lock
from dist_harness import run_distributed


# --------------------------------------------------------------------------------------------------------
# Stop requests


def test_signal_sets_the_code_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with StopGuard(["SIGTERM", "USR1"]) as guard:
        assert guard.agreed_stop() == NO_STOP
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.agreed_stop() == signal.SIGUSR1
        assert describe_stop(guard.agreed_stop()) == "SIGUSR1 received"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_second_sigint_interrupts_at_once():
    with StopGuard(["SIGINT"]) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.agreed_stop() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


def test_unwinding_loops_raise_at_the_boundary_after_the_signal():
    """``raise_if_stopping`` (the demo's check): silent until a signal arrives, then ``StopRequested`` naming it."""
    with StopGuard(["SIGTERM"]) as guard:
        guard.raise_if_stopping()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(StopRequested, match="^SIGTERM received$") as stop:
            guard.raise_if_stopping()
    assert stop.value.code == signal.SIGTERM


def test_time_budget_stops_before_the_next_step_would_pass_it():
    now = [0.0]
    guard = StopGuard([], max_minutes=1.0, clock=lambda: now[0])
    verdicts = []
    for t in (20.0, 40.0):  # steps of 20 s: at 20 s, 20 + 20 < 60; at 40 s, 40 + 20 >= 60
        now[0] = t
        verdicts.append(guard.agreed_stop())
    assert verdicts == [NO_STOP, TIME_BUDGET]
    assert StopGuard([], max_minutes=0.0, clock=lambda: 1e9).agreed_stop() == NO_STOP  # 0 = no budget


def test_signal_names():
    assert parse_signal("TERM") == parse_signal("SIGTERM") == parse_signal("15") == signal.SIGTERM
    with pytest.raises(ConfigError, match="'SIGNOPE' is not a signal name"):
        parse_signal("SIGNOPE")


def _agree(rank: int, world: int) -> list[int]:
    with StopGuard(["SIGTERM"]) as guard:
        codes = []
        for boundary in range(3):
            if rank == 1 and boundary == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            codes.append(guard.agreed_stop())
        return codes


@pytest.mark.slow
def test_one_signalled_rank_stops_every_rank_at_the_same_boundary():
    assert run_distributed(_agree, 2) == [[0, 0, signal.SIGTERM]] * 2


# --------------------------------------------------------------------------------------------------------
# Run-directory lock


def owner(**kw) -> LockOwner:
    me = run_lock.current_owner("test")
    return LockOwner(**{**me.__dict__, **kw})


def write_lock(path, o: LockOwner) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / LOCK_NAME).write_text(json.dumps(o.__dict__))


@pytest.fixture
def outside_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_lock_taken_and_released(tmp_path, outside_slurm):
    assert try_lock(tmp_path, run_lock.current_owner("caopd run")) is None
    saved = json.loads((tmp_path / LOCK_NAME).read_text())
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()
    run_lock.HELD.append((tmp_path / LOCK_NAME, run_lock.current_owner("caopd run")))
    run_lock.release_held_locks()
    assert not (tmp_path / LOCK_NAME).exists()


def test_live_process_refused_dead_process_taken_over(tmp_path, outside_slurm, caplog):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, owner(pid=live.pid, pid_start=run_lock.process_start(live.pid), command="caopd run"))
        refusal = try_lock(tmp_path, run_lock.current_owner("caopd run"))
        assert refusal is not None and f"pid {live.pid}" in refusal and "is in use by a process" in refusal
    finally:
        live.kill()
        live.wait()
    assert try_lock(tmp_path, run_lock.current_owner("caopd run")) is None  # its pid is gone now
    assert "taking over the stale run lock" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_exited_unreaped_process_is_not_the_owner(tmp_path, outside_slurm):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while run_lock.proc_stat(child.pid)[:1] != ["Z"]:  # exited; its parent (us) has not reaped it yet
        time.sleep(0.05)
    write_lock(tmp_path, owner(pid=child.pid, pid_start=run_lock.process_start(child.pid)))
    assert try_lock(tmp_path, run_lock.current_owner("x")) is None
    child.wait()


def test_recycled_pid_is_not_the_owner(tmp_path, outside_slurm):
    write_lock(tmp_path, owner(pid=os.getppid(), pid_start="1"))  # alive, but started at another time
    assert try_lock(tmp_path, run_lock.current_owner("x")) is None


def test_other_host_without_job_is_refused(tmp_path, outside_slurm):
    write_lock(tmp_path, owner(host="elsewhere", pid=1))
    assert "on host elsewhere" in try_lock(tmp_path, run_lock.current_owner("x"))


def test_slurm_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    write_lock(tmp_path, owner(job_id="41", host="elsewhere", pid=1))
    assert try_lock(tmp_path, run_lock.current_owner("x")) is None  # ours: a requeued job or its next phase
    states = {"40": "RUNNING", "39": ""}
    monkeypatch.setattr(run_lock, "slurm_job_state", states.get)
    write_lock(tmp_path, owner(job_id="40", host="elsewhere", pid=1))
    assert "in use by Slurm job 40 on host elsewhere" in try_lock(tmp_path, run_lock.current_owner("x"))
    write_lock(tmp_path, owner(job_id="39", host=socket.gethostname(), pid=os.getpid() + 10**6))
    assert try_lock(tmp_path, run_lock.current_owner("x")) is None  # Slurm no longer lists job 39


def _locked(rank: int, world: int, run_dir: str) -> str:
    try:
        acquire_run_lock(run_dir)
    except RunLockedError as exc:
        return str(exc)
    return "acquired"


@pytest.mark.slow
def test_every_rank_gets_rank0_verdict(tmp_path, outside_slurm):
    write_lock(tmp_path, owner(host="elsewhere", pid=1))
    verdicts = run_distributed(_locked, 2, str(tmp_path))
    assert verdicts[0] == verdicts[1] and "is in use by a process on host elsewhere" in verdicts[0]


# --------------------------------------------------------------------------------------------------------
# Rendezvous


def test_expand_nodelist_by_hand():
    assert expand_nodelist("a[01-03,7],b,c[9-10]x") == ["a01", "a02", "a03", "a7", "b", "c9x", "c10x"]
    assert expand_nodelist("localhost") == ["localhost"]


def test_rendezvous_from_slurm_variables():
    env = {"SLURM_STEP_NODELIST": "localhost,other", "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "3"}
    r = slurm_rendezvous(env)
    assert (r.addr, r.port) == ("127.0.0.1", 20000 + (1234 % 750) * 16 + 3)
    assert "head node localhost" in r.origin and "job 1234 step 3" in r.origin
    assert derived_port(1234, 3) != derived_port(1235, 3) and derived_port(1234, 3) != derived_port(1234, 4)
    assert slurm_rendezvous({**env, "SLURM_STEP_ID": "batch"}).port == derived_port(1234, 0)
    r = slurm_rendezvous({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert (r.addr, r.port) == ("10.0.0.1", 29400)
