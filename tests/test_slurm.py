"""The launcher on a real (private, one-node) Slurm: examples/caopd_tiny_cpu.slurm as a cluster user submits it.

References: an uninterrupted job of the same config and layout (its ``train_log.jsonl`` rows and final
student weights, compared exactly), the run's own checkpoint steps (no step lost: the interrupted job's
checkpoint is at its last logged step + 1; none repeated: each step logged once, saved at most once), and
``scontrol show hostnames`` for the nodelist expansion.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from caopd_megatron.runtime.distributed import expand_nodelist
from slurm_cluster import Job, SlurmCluster, missing_binaries

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "caopd_tiny_cpu.slurm"
STEPS = 60  # long enough (~0.1-0.3 s a step) for a signal to land mid-run


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


def submit(cluster: SlurmCluster, out: Path, name: str, *overrides: str, options: tuple[str, ...] = (),
           env: dict[str, str] | None = None) -> Job:
    return cluster.sbatch(SCRIPT, *overrides, options=(f"--job-name={name}", f"--output={out}", *options),
                          env={**job_env(), **(env or {})}, cwd=ROOT)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def job_logs(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / "logs").glob("*.log")))


def wait_for_step(run: Path, job: Job, step: int, timeout: float = 300.0) -> None:
    """Until rank 0's job log shows training step ``step`` (the job is then mid-run)."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"phases: step {step}:")
    while time.monotonic() < deadline:
        log = run / "logs" / f"job-{job.job_id}.log"
        if log.is_file() and pattern.search(log.read_text()):
            return
        assert job.state() in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job.job_id} ended: {job.state()}"
        time.sleep(0.1)
    raise TimeoutError(f"job {job.job_id} did not reach step {step}")


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


COMMON = (f"distill.steps={STEPS}", "checkpoint.save_interval=25", "parallel.tensor_model_parallel_size=2")


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Path:
    """(a) `sbatch --wait`-style: the uninterrupted job, the reference of the interrupted ones."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    job = submit(cluster, tmp / "out.txt", "ref", f"run.output_dir={run}", *COMMON)
    assert job.wait() == "COMPLETED", (tmp / "out.txt").read_text()[-3000:]
    return run


def test_sbatch_completes_with_rank_aware_logs(cluster, reference, tmp_path):
    rows = read_log(reference)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert saved_steps(reference) == [25, 50, STEPS]  # the last step saved once, not twice
    (log,) = (reference / "logs").glob("job-*.log")
    env = json.loads(log.with_suffix(".env.json").read_text())
    assert env["environment"]["SLURM_NTASKS"] == "2" and env["environment"]["SLURM_JOB_ID"] in log.name
    assert "tensor_model_parallel_size: 2" in log.with_suffix(".config.yaml").read_text()
    assert "rendezvous: MASTER_ADDR=127.0.0.1 MASTER_PORT=" in log.read_text()
    # Rank 1 logs warnings only: each step's line appears once in the job's output, from rank 0.
    output = (reference.parent / "out.txt").read_text()
    assert len(re.findall(r"phases: step 3:", output)) == 1
    assert all("WARNING" in line or "ERROR" in line for line in output.splitlines() if "[rank 1]" in line)
    assert not (reference / "caopd.lock").exists()  # released at exit
    # The nodelist expansion agrees with Slurm's own.
    compact = "node[001-003,7],gpu[10-11],login"
    hosts = cluster.run("scontrol", "show", "hostnames", compact).stdout.split()
    assert expand_nodelist(compact) == hosts


def test_sigterm_saves_at_next_step_and_resubmission_continues(cluster, reference, tmp_path):
    """(b) scancel --signal=TERM mid-run (what a preemption sends): the job saves after the step it is in
    and exits 75; a resubmission ends with the reference's log and weights: no step lost, none repeated."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path / "out1.txt", "sigterm", f"run.output_dir={run}", *COMMON,
                 options=("--no-requeue",))
    wait_for_step(run, job, 3)
    cluster.run("scancel", "--signal=TERM", job.job_id)
    assert job.wait() == "FAILED" and job.exit_code() == 75, (tmp_path / "out1.txt").read_text()[-3000:]
    interrupted = read_log(run)
    stopped_at = len(interrupted)
    assert 3 < stopped_at < STEPS
    assert saved_steps(run) == [s for s in (25, 50) if s < stopped_at] + [stopped_at]  # steps lost: 0
    assert "SIGTERM received: saved step" in job_logs(run)

    again = submit(cluster, tmp_path / "out2.txt", "sigterm2", f"run.output_dir={run}", *COMMON,
                   options=("--no-requeue",))
    assert again.wait() == "COMPLETED", (tmp_path / "out2.txt").read_text()[-3000:]
    assert read_log(run) == read_log(reference)
    steps = saved_steps(run)
    assert len(steps) == len(set(steps)) and steps[-1] == STEPS
    assert_same_weights(final_student(run, STEPS), final_student(reference, STEPS))


# Seen once in a full CI run (passes alone and in the helper's runs): the first attempt saved and exited 75,
# the job was requeued, and the requeued attempt ended FAILED without writing a log line. Suspected cause: the
# attempt reused its predecessor's rendezvous port (fixed: the port now includes SLURM_RESTART_COUNT); kept
# non-strict until repeated full runs show it gone (issue 13's note).
@pytest.mark.xfail(strict=False, reason="requeued attempt ended FAILED once in a full run; see the comment above")
def test_warning_signal_requeues_and_finishes(cluster, reference, tmp_path):
    """(c) --requeue + Slurm's --signal=B:USR1 warning (sent here with scancel --batch, as slurmctld does
    before the time limit): the batch shell forwards it, caopd saves and exits 75, the job requeues itself,
    appends to its output file and finishes with the reference's log and weights."""
    run, out = tmp_path / "run", tmp_path / "out.txt"
    job = submit(cluster, out, "requeue", f"run.output_dir={run}", *COMMON)
    wait_for_step(run, job, 3)
    cluster.run("scancel", "--batch", "--signal=USR1", job.job_id)
    assert job.wait(release_requeued=True) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    assert "restart 0" in text and "restart 1" in text and "requeueing job" in text
    assert "SIGUSR1 received: saved step" in job_logs(run)
    assert read_log(run) == read_log(reference)
    steps = saved_steps(run)
    assert len(steps) == len(set(steps))
    assert_same_weights(final_student(run, STEPS), final_student(reference, STEPS))
    assert (run / "logs" / f"job-{job.job_id}.restart-1.log").is_file()


def test_second_job_refused_and_concurrent_jobs_get_distinct_ports(cluster, tmp_path):
    """(d) a second job on a run directory in use is refused with one line (exit 2); (e) two jobs sharing
    the node at once both rendezvous (ports derived from their job ids)."""
    one_task = ("--ntasks=1", "--no-requeue")
    long_run, other = tmp_path / "long", tmp_path / "other"
    holder = submit(cluster, tmp_path / "holder.txt", "holder", f"run.output_dir={long_run}", "distill.steps=100000",
                    "checkpoint.save_interval=0", options=one_task)
    wait_for_step(long_run, holder, 1)
    neighbour = submit(cluster, tmp_path / "neighbour.txt", "neighbour", f"run.output_dir={other}",
                       "distill.steps=3", options=one_task)
    assert neighbour.wait() == "COMPLETED", (tmp_path / "neighbour.txt").read_text()[-3000:]
    assert holder.state() == "RUNNING"  # they overlapped: the holder ran through the neighbour's whole life
    ports = [re.search(r"MASTER_PORT=(\d+)", job_logs(r)).group(1) for r in (long_run, other)]
    assert ports[0] != ports[1]

    intruder = submit(cluster, tmp_path / "intruder.txt", "intruder", f"run.output_dir={long_run}", options=one_task)
    assert intruder.wait() == "FAILED" and intruder.exit_code() == 2
    message = (tmp_path / "intruder.txt").read_text()
    assert f"is in use by Slurm job {holder.job_id} on host" in message and "Traceback" not in message
    assert holder.state() == "RUNNING"
    cluster.run("scancel", "--signal=TERM", holder.job_id)
    assert holder.wait() == "FAILED" and holder.exit_code() == 75
    assert read_log(long_run)[-1]["step"] + 1 == saved_steps(long_run)[-1]


def test_phase_loop_at_tp2_equals_caopd_run(cluster, tmp_path):
    """(f) CAOPD_MODE=phases: rollout / rewrite (one task) / distill steps at TP=2 until the run is complete,
    then a resubmission finds nothing to do; the log and weights equal `caopd run`'s."""
    overrides = ("distill.steps=2", "parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1")
    ran, phased = tmp_path / "ran", tmp_path / "phased"
    straight = submit(cluster, tmp_path / "run.txt", "straight", f"run.output_dir={ran}", *overrides)
    assert straight.wait() == "COMPLETED", (tmp_path / "run.txt").read_text()[-3000:]
    loop = submit(cluster, tmp_path / "phases.txt", "phases", f"run.output_dir={phased}", *overrides,
                  env={"CAOPD_MODE": "phases"}, options=("--time=30",))
    assert loop.wait(timeout=1200) == "COMPLETED", (tmp_path / "phases.txt").read_text()[-3000:]
    assert read_log(phased) == read_log(ran)
    assert_same_weights(final_student(phased, 2), final_student(ran, 2))
    assert "training is complete, no rollout to do" in (tmp_path / "phases.txt").read_text()
    assert sorted(p.name for p in (phased / "phases").iterdir()) == [
        "step_000000.revised.jsonl", "step_000000.rollouts.jsonl", "step_000001.revised.jsonl",
        "step_000001.rollouts.jsonl"]
