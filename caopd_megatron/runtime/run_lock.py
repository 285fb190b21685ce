"""One live job per run directory: a lock file naming its owner (Slurm job id, host, pid).

Design decisions:
- Rank 0 alone (of the process group, or of the launcher's ranks in a single-task phase) creates ``<run_dir>/caopd.lock`` (O_CREAT | O_EXCL, so two creators cannot both win) and
  broadcasts its verdict; the other ranks raise the same one-line ``RunLockedError`` when it refuses.
- An existing lock is ours when it names this Slurm job (a requeued job or the next phase of the same
  job) or this very process. It is live when its Slurm job is still pending or running (``squeue``), or, for
  a job we cannot ask about or a run outside Slurm, when its pid is alive on this host with the same start
  time (a recycled pid is not the owner). A lock from another host without a Slurm job cannot be checked and
  is treated as live. A stale lock is taken over (logged with its old owner).
- The lock is released (deleted, if still ours) when the process exits normally; a killed job leaves it
  behind, and the next job finds it stale.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from caopd_megatron.runtime.distributed import is_main_rank

log = logging.getLogger(__name__)

LOCK_NAME = "caopd.lock"
LIVE_JOB_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                   "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


class RunLockedError(RuntimeError):
    """Another live job holds the run directory."""


@dataclass(frozen=True)
class LockOwner:
    job_id: str  # SLURM_JOB_ID, "" outside Slurm
    host: str
    pid: int
    pid_start: str  # the pid's start time in clock ticks since boot ("" where /proc is missing)
    command: str

    def describe(self) -> str:
        job = f"Slurm job {self.job_id}" if self.job_id else "a process"
        return f"{job} on host {self.host} (pid {self.pid}, `{self.command}`)"


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first), [] when unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()


def process_start(pid: int) -> str:
    """The pid's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), "" when unavailable."""
    fields = proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def current_owner(command: str) -> LockOwner:
    pid = os.getpid()
    return LockOwner(os.environ.get("SLURM_JOB_ID", ""), socket.gethostname(), pid, process_start(pid), command)


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from ``squeue`` ("" when Slurm no longer lists it), None when squeue cannot be asked."""
    if not shutil.which("squeue"):
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue fails with "Invalid job id specified" once the job has left the controller's memory.
        return "" if "Invalid job id" in proc.stderr else None
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""


def pid_alive(owner: LockOwner) -> bool:
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = proc_stat(owner.pid)
    if fields and fields[0] == "Z":  # exited, not yet reaped by its parent
        return False
    return not owner.pid_start or not fields or fields[19] == owner.pid_start


def holder_is_live(owner: LockOwner, me: LockOwner) -> bool:
    """True when the lock's owner may still be using the directory (see the module docstring)."""
    if owner.job_id:
        state = slurm_job_state(owner.job_id)
        if state is not None:
            return state in LIVE_JOB_STATES
    if owner.host != me.host:
        return True
    return pid_alive(owner)


def is_ours(owner: LockOwner, me: LockOwner) -> bool:
    same_job = bool(owner.job_id) and owner.job_id == me.job_id
    return same_job or (owner.host == me.host and owner.pid == me.pid)


def read_owner(path: Path) -> LockOwner | None:
    try:
        return LockOwner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_new_lock(path: Path, owner: LockOwner) -> bool:
    """Create the lock file atomically; False if it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(owner)) + "\n")
    return True


def try_lock(run_dir: Path, me: LockOwner) -> str | None:
    """Take the lock (rank 0's side); None on success, else the refusal message."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    for _ in range(3):  # a lock removed between our attempts: try again
        if write_new_lock(path, me):
            return None
        owner = read_owner(path)
        if owner is None:  # half-written by a creator killed mid-write, or emptied
            log.warning("run lock %s is unreadable; taking it over", path)
        elif is_ours(owner, me):
            pass
        elif holder_is_live(owner, me):
            return (f"run directory {run_dir} is in use by {owner.describe()}; wait for it to finish, or use "
                    f"another run.output_dir (delete {path} only if that job is really gone)")
        else:
            log.warning("taking over the stale run lock of %s", owner.describe())
        path.unlink(missing_ok=True)
    return f"could not take the run lock {path}: it keeps changing owner"


HELD: list[tuple[Path, LockOwner]] = []


def release_held_locks() -> None:
    """Delete every lock this process holds if it still names this process (atexit)."""
    while HELD:
        path, me = HELD.pop()
        owner = read_owner(path)
        if owner is not None and owner.pid == me.pid and owner.host == me.host:
            path.unlink(missing_ok=True)


atexit.register(release_held_locks)


def acquire_run_lock(run_dir: str | Path, command: str = "caopd") -> None:
    """Collective when distributed: rank 0 takes the lock, every rank raises ``RunLockedError`` on refusal."""
    run_dir = Path(run_dir)
    me = current_owner(command)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    refusal = None
    if is_main_rank():
        refusal = try_lock(run_dir, me)
        if refusal is None:
            HELD.append((run_dir / LOCK_NAME, me))
    if distributed:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal is not None:
        raise RunLockedError(refusal)
