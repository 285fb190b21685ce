"""A private one-node Slurm cluster for the tests: munged, slurmctld and slurmd started without systemd.

Everything lives in one temporary folder (config, state, spool, logs, munge socket) and on free ports, so it
neither needs nor touches a system Slurm. No cgroups (``proctrack/linuxproc``, ``task/none``): it works in a
container. Installation: ``.ci/install_slurm.sh``. Without the binaries the tests skip, except under CI
(env ``CI`` set), where a missing Slurm is a failure.

Two settings make it quick without changing what a job sees:
- The node offers ``cpus`` slots (default 12) whatever the machine has (``SlurmdParameters=config_overrides``),
  so independent test jobs run at the same time instead of queueing behind each other.
- ``cred_expire`` is 20 s instead of 120: Slurm holds a requeued job that long before starting it again. The
  tests must not end the hold themselves (``scontrol update StartTime=now``): slurmd revokes the killed
  attempt's credential at the requeue, and a new attempt whose credential is dated in the same second is
  refused ("Killing non-startable batch JobId=N: Job credential revoked" in slurmctld.log); the job then ends
  FAILED without running a line of its script. That was the requeue test's intermittent failure: it happened
  only when the scheduler started the released job within the second of the requeue (an idle controller).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
REQUEUE_HOLD_S = 20  # AuthInfo cred_expire: how long Slurm holds a requeued job (see the module docstring)
TRANSIENT_ERRORS = ("Socket timed out", "Unable to contact slurm controller")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    job_id: str
    cluster: "SlurmCluster"

    def state(self) -> str:
        return self.cluster.job_field(self.job_id, "JobState")

    def ended(self) -> bool:
        return self.state() in ENDED_STATES

    def wait(self, timeout: float = 600.0) -> str:
        """Wait until the job has ended (a requeued job: its last attempt); returns its final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state in ENDED_STATES:
                return state
            time.sleep(0.3)
        raise TimeoutError(f"job {self.job_id} still {self.state()} after {timeout:.0f} s")

    def exit_code(self) -> int:
        return int(self.cluster.job_field(self.job_id, "ExitCode").split(":")[0])


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 12) -> None:
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.procs: list[Path] = []  # pid files of the daemons this cluster started

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "plugstack.conf").write_text("")
        self.conf.write_text(f"""ClusterName=caopdtest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.socket,cred_expire={REQUEUE_HOLD_S}
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=20
MinJobAge=600
NodeName=localhost NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        r = self.root
        subprocess.run([binary("munged"), f"--socket={r}/munge.socket", f"--key-file={MUNGE_KEY}",
                        f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge.seed",
                        "--force"], check=True, capture_output=True)
        self.procs.append(r / "munged.pid")
        subprocess.run([binary("slurmctld"), "-i"], env=self.env, check=True, capture_output=True)
        self.procs.append(r / "slurmctld.pid")
        subprocess.run([binary("slurmd"), "-N", "localhost"], env=self.env, check=True, capture_output=True)
        self.procs.append(r / "slurmd.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() == "idle":
                return
            time.sleep(0.1)
        raise RuntimeError(f"the test Slurm did not come up; see {r}/log")

    def stop(self) -> None:
        """Cancel every job first (a test that failed mid-way must not leave its job running, holding its
        port and CPU after the daemons are gone), then stop the daemons."""
        if self.procs:
            self.run("scancel", "--full", f"--user={pwd.getpwuid(os.getuid()).pw_name}", check=False)
            for _ in range(100):
                if not self.run("squeue", "-h", check=False).stdout.strip():
                    break
                time.sleep(0.2)
        for pid_file in reversed(self.procs):
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError, IndexError):
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self.procs.clear()

    def run(self, *cmd: str, check: bool = True, attempts: int = 5) -> subprocess.CompletedProcess:
        """Run a Slurm command; one killed by a signal or timed out talking to slurmctld (both seen at load
        averages of 40-60 on the 2-core test machine) is retried."""
        for _ in range(attempts):
            proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
            if proc.returncode >= 0 and not any(t in proc.stderr for t in TRANSIENT_ERRORS):
                break
            time.sleep(1.0)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def job_field(self, job_id: str, name: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for token in out.split():
            key, _, value = token.partition("=")
            if key == name:
                return value
        raise KeyError(f"{name} not in scontrol show job {job_id}")

    def sbatch(self, script: Path, *args: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None,
               cwd: Path | None = None) -> Job:
        proc = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, cwd=cwd, timeout=60)
        if proc.returncode:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return Job(proc.stdout.strip().split(";")[0], self)
