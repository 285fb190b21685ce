"""The phase loop (CAOPD_MODE=phases) against `caopd run` on a private one-node Slurm, tiny job at TP=2.

Starts the same test cluster as tests/test_slurm.py (needs .ci/install_slurm.sh's packages and root), submits
examples/caopd_tiny_cpu.slurm once per mode with the same overrides, and reports each job's wall time from
Slurm's own start and end times, the per-step overhead of the phase loop, and whether both runs' logs agree.

    python benchmarks/bench_phase_loop.py                      # 4 steps, results in benchmarks/results/
    python benchmarks/bench_phase_loop.py --steps 8 -- rollout.samples_per_prompt=8
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slurm_cluster import SlurmCluster  # noqa: E402
from test_slurm import read_log, submit  # noqa: E402


def elapsed_s(cluster: SlurmCluster, job_id: str) -> float:
    start, end = (datetime.fromisoformat(cluster.job_field(job_id, k)) for k in ("StartTime", "EndTime"))
    return (end - start).total_seconds()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    overrides = (f"distill.steps={args.steps}", "parallel.tensor_model_parallel_size=2", "checkpoint.save_interval=1",
                 *args.overrides)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cluster = SlurmCluster(tmp / "slurm")
        cluster.start()
        try:
            times, logs = {}, {}
            for mode in ("run", "phases"):
                job = submit(cluster, tmp / f"{mode}.txt", mode, f"run.output_dir={tmp / mode}", *overrides,
                             env={"CAOPD_MODE": mode}, options=("--time=120",))
                if job.wait(timeout=3600) != "COMPLETED":
                    raise SystemExit((tmp / f"{mode}.txt").read_text()[-3000:])
                times[mode], logs[mode] = elapsed_s(cluster, job.job_id), read_log(tmp / mode)
        finally:
            cluster.stop()
    result = {"steps": args.steps, "overrides": list(overrides), "run_s": times["run"], "phases_s": times["phases"],
              "overhead_per_step_s": (times["phases"] - times["run"]) / args.steps,
              "same_train_log": logs["run"] == logs["phases"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "phase_loop.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
