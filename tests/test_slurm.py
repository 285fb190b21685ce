"""The launcher on a real (private, one-node) Slurm: examples/caopd_tiny_cpu.slurm as a cluster user submits it.

References: an uninterrupted job of the same config and layout (its ``train_log.jsonl`` rows and final
student weights, compared exactly), the run's own checkpoint steps (no step lost: the interrupted job's
checkpoint is at its last logged step + 1; none repeated: each step logged once, saved at most once), and
``scontrol show hostnames`` for the nodelist expansion.

Speed: every job that waits for no other is submitted at once by the ``wave`` fixture (the test node has a
slot for each), so the module costs about as long as its longest chain of jobs, not the sum of them. The
phase loop trains one step: rollout, rewrite, distill, then the loop's second rollout finds the run complete
(four job steps; a second training round would add three process starts and test nothing new here: phases
resuming from a checkpoint are tests/test_cli_e2e.py's, resuming at TP=2 under Slurm the signal tests').
Run alone: ``pytest -m slurm --durations=0 tests/test_slurm.py``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from caopd_megatron.runtime.distributed import expand_nodelist
from slurm_cluster import REQUEUE_HOLD_S, Job, SlurmCluster, missing_binaries

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "caopd_tiny_cpu.slurm"
STEPS = 30  # long enough (0.1-0.5 s a step) for a signal sent at step 3 to land mid-run
SAVE = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        message = f"Slurm binaries missing ({', '.join(missing)}); install with .ci/install_slurm.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def job_env() -> dict[str, str]:
    """The submitting shell's environment without launcher variables, with the checkout's caopd."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "CAOPD": f"{sys.executable} -m caopd_megatron.cli.main", "PYTHONPATH": str(ROOT)}


@dataclass
class Submitted:
    """A job of the tiny example, its run directory and its output file."""

    job: Job
    run: Path
    out: Path

    def output(self) -> str:
        return self.out.read_text() if self.out.is_file() else ""

    def tail(self) -> str:
        return self.output()[-3000:]


def submit(cluster: SlurmCluster, folder: Path, *overrides: str, run: Path | None = None,
           options: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Submitted:
    """sbatch examples/caopd_tiny_cpu.slurm as a user does; the job is named after ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    run, out = run or folder / "run", folder / "out.txt"
    job = cluster.sbatch(SCRIPT, f"run.output_dir={run}", *overrides,
                         options=(f"--job-name={folder.name}", f"--output={out}", *options),
                         env={**job_env(), **(env or {})}, cwd=ROOT)
    return Submitted(job, run, out)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def job_logs(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / "logs").glob("*.log")))


def reached_step(s: Submitted, step: int) -> bool:
    """Rank 0's job log shows training step ``step`` (the job is then mid-run); fails if the job has ended."""
    log = s.run / "logs" / f"job-{s.job.job_id}.log"
    if log.is_file() and re.search(rf"phases: step {step}:", log.read_text()):
        return True
    assert not s.job.ended(), f"job {s.job.job_id} ended: {s.job.state()}\n{s.tail()}"
    return False


def final_student(run: Path, step: int) -> list[dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step_{step:06d}"
    return [torch.load(f, weights_only=True)["student"] for f in sorted(folder.glob("rank_*.pt"))]


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def saved_steps(run: Path) -> list[int]:
    return [int(s) for s in re.findall(r"saved checkpoint \S+/step_(\d+) \(rank 0", job_logs(run))]


def master_port(run: Path) -> str:
    return re.search(r"MASTER_PORT=(\d+)", job_logs(run)).group(1)


COMMON = (f"distill.steps={STEPS}", f"checkpoint.save_interval={SAVE}", "parallel.tensor_model_parallel_size=2")
PHASE_RUN = ("distill.steps=1", "parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1")
ONE_TASK = ("--ntasks=1", "--no-requeue")


@pytest.fixture(scope="module")
def wave(cluster, tmp_path_factory) -> dict[str, Submitted]:
    """Every job that waits for no other, submitted at once, the longest chain first:

    phases / straight (f), reference (a, the reference of b and c), sigterm (b), requeue (c), holder (d, e).
    Then, polling their job logs: SIGTERM to `sigterm` and the batch shell's USR1 to `requeue` at their step
    3; the `intruder` (same run directory) and the `neighbour` (another one) once the holder is at step 1.
    """
    d = tmp_path_factory.mktemp("wave")
    jobs = {
        "phases": submit(cluster, d / "phases", *PHASE_RUN, env={"CAOPD_MODE": "phases"}, options=("--time=30",)),
        "straight": submit(cluster, d / "straight", *PHASE_RUN),
        "reference": submit(cluster, d / "reference", *COMMON),
        "sigterm": submit(cluster, d / "sigterm", *COMMON, options=("--no-requeue",)),
        "requeue": submit(cluster, d / "requeue", *COMMON),
        "holder": submit(cluster, d / "holder", "distill.steps=100000", "checkpoint.save_interval=0",
                         options=ONE_TASK),
    }

    def second_and_neighbour() -> None:
        jobs["intruder"] = submit(cluster, d / "intruder", run=jobs["holder"].run, options=ONE_TASK)
        jobs["neighbour"] = submit(cluster, d / "neighbour", "distill.steps=3", options=ONE_TASK)

    actions = {
        "sigterm": (3, lambda: cluster.run("scancel", "--signal=TERM", jobs["sigterm"].job.job_id)),
        "requeue": (3, lambda: cluster.run("scancel", "--batch", "--signal=USR1", jobs["requeue"].job.job_id)),
        "holder": (1, second_and_neighbour),
    }
    deadline = time.monotonic() + 600
    while actions:
        assert time.monotonic() < deadline, f"no step reached in time: {sorted(actions)}"
        for name, (step, act) in list(actions.items()):
            if reached_step(jobs[name], step):
                act()
                del actions[name]
        time.sleep(0.1)
    return jobs


def test_sbatch_completes_with_rank_aware_logs(cluster, wave):
    """(a) the uninterrupted job: each step logged once, saves at the interval and at the end (the last step
    once), the job's environment and resolved config beside its log, rank 1 quiet."""
    ref = wave["reference"]
    assert ref.job.wait() == "COMPLETED", ref.tail()
    rows = read_log(ref.run)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert saved_steps(ref.run) == list(range(SAVE, STEPS + 1, SAVE))  # the last step saved once, not twice
    (log,) = (ref.run / "logs").glob("job-*.log")
    env = json.loads(log.with_suffix(".env.json").read_text())
    assert env["environment"]["SLURM_NTASKS"] == "2" and env["environment"]["SLURM_JOB_ID"] in log.name
    assert "tensor_model_parallel_size: 2" in log.with_suffix(".config.yaml").read_text()
    assert "rendezvous: MASTER_ADDR=127.0.0.1 MASTER_PORT=" in log.read_text()
    # Rank 1 logs warnings only: each step's line appears once in the job's output, from rank 0.
    output = ref.output()
    assert len(re.findall(r"phases: step 3:", output)) == 1
    assert all("WARNING" in line or "ERROR" in line for line in output.splitlines() if "[rank 1]" in line)
    assert not (ref.run / "caopd.lock").exists()  # released at exit
    # The nodelist expansion agrees with Slurm's own.
    compact = "node[001-003,7],gpu[10-11],login"
    hosts = cluster.run("scontrol", "show", "hostnames", compact).stdout.split()
    assert expand_nodelist(compact) == hosts


def test_second_job_refused_and_concurrent_jobs_get_distinct_ports(cluster, wave):
    """(d) a second job on a run directory in use is refused with one line (exit 2); (e) jobs sharing the
    node at once all rendezvous (ports derived from their job ids): the neighbour's whole life falls inside
    the holder's, and the wave's 2-task jobs ran side by side."""
    holder, intruder, neighbour = wave["holder"], wave["intruder"], wave["neighbour"]
    assert intruder.job.wait() == "FAILED" and intruder.job.exit_code() == 2, intruder.tail()
    message = intruder.output()
    assert f"is in use by Slurm job {holder.job.job_id} on host" in message and "Traceback" not in message
    assert neighbour.job.wait() == "COMPLETED", neighbour.tail()
    assert holder.job.state() == "RUNNING"  # it held its port and its directory through both
    ports = [master_port(s.run) for s in (holder, neighbour, wave["reference"], wave["sigterm"], wave["requeue"],
                                          wave["straight"])]
    assert len(set(ports)) == len(ports), ports
    cluster.run("scancel", "--signal=TERM", holder.job.job_id)
    assert holder.job.wait() == "FAILED" and holder.job.exit_code() == 75, holder.tail()
    assert read_log(holder.run)[-1]["step"] + 1 == saved_steps(holder.run)[-1]


def test_sigterm_saves_at_next_step_and_resubmission_continues(cluster, wave):
    """(b) scancel --signal=TERM mid-run (what a preemption sends): the job saves after the step it is in
    and exits 75; a resubmission ends with the reference's log and weights: no step lost, none repeated."""
    first, ref = wave["sigterm"], wave["reference"]
    assert first.job.wait() == "FAILED" and first.job.exit_code() == 75, first.tail()
    stopped_at = len(read_log(first.run))
    assert 3 < stopped_at < STEPS
    assert saved_steps(first.run) == [s for s in range(SAVE, STEPS, SAVE) if s < stopped_at] + [stopped_at]
    assert "SIGTERM received: saved step" in job_logs(first.run)

    again = submit(cluster, first.out.parent / "again", *COMMON, run=first.run, options=("--no-requeue",))
    assert again.job.wait() == "COMPLETED", again.tail()
    assert ref.job.wait() == "COMPLETED", ref.tail()
    assert read_log(first.run) == read_log(ref.run)
    steps = saved_steps(first.run)
    assert len(steps) == len(set(steps)) and steps[-1] == STEPS
    assert_same_weights(final_student(first.run, STEPS), final_student(ref.run, STEPS))


def test_warning_signal_requeues_and_finishes(cluster, wave):
    """(c) --requeue + Slurm's --signal=B:USR1 warning (sent here with scancel --batch, as slurmctld does
    before the time limit): the batch shell forwards it, caopd saves and exits 75, the job requeues itself,
    Slurm holds it (cred_expire) and starts it again; it appends to its output file and finishes with the
    reference's log and weights."""
    s, ref = wave["requeue"], wave["reference"]
    assert s.job.wait() == "COMPLETED", s.tail()
    text = s.output()
    assert "restart 0" in text and "restart 1" in text and "requeueing job" in text
    assert cluster.job_field(s.job.job_id, "Restarts") == "1"
    # Slurm's own hold, not the test, decided when the second attempt started (see tests/slurm_cluster.py).
    warned = re.search(r"USR1 \(time limit or preemption warning\) at (\d+):(\d+):(\d+)", text).groups()
    restarted = re.search(r"restart 1 on .* (\d+):(\d+):(\d+)$", text, re.M).groups()
    clock = [int(h) * 3600 + int(m) * 60 + int(sec) for h, m, sec in (warned, restarted)]
    assert (clock[1] - clock[0]) % 86400 >= REQUEUE_HOLD_S
    assert "SIGUSR1 received: saved step" in job_logs(s.run)
    assert ref.job.wait() == "COMPLETED", ref.tail()
    assert read_log(s.run) == read_log(ref.run)
    steps = saved_steps(s.run)
    assert len(steps) == len(set(steps))
    assert_same_weights(final_student(s.run, STEPS), final_student(ref.run, STEPS))
    assert (s.run / "logs" / f"job-{s.job.job_id}.restart-1.log").is_file()


def test_phase_loop_at_tp2_equals_caopd_run(cluster, wave):
    """(f) CAOPD_MODE=phases: rollout / rewrite (one task) / distill steps at TP=2 until the run is complete
    (the loop's next rollout finds nothing to do); the log and weights equal `caopd run`'s."""
    straight, phased = wave["straight"], wave["phases"]
    assert straight.job.wait() == "COMPLETED", straight.tail()
    assert phased.job.wait() == "COMPLETED", phased.tail()
    assert read_log(phased.run) == read_log(straight.run)
    assert [r["step"] for r in read_log(phased.run)] == [0]
    assert_same_weights(final_student(phased.run, 1), final_student(straight.run, 1))
    assert "training is complete, no rollout to do" in phased.output()
    assert sorted(p.name for p in (phased.run / "phases").iterdir()) == [
        "step_000000.revised.jsonl", "step_000000.rollouts.jsonl"]
