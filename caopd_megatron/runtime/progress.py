"""Progress bars and logging set-up shared by every phase.

Design decisions:
- tqdm bars only on the main rank and only when enabled (``logging.progress``) and a description is given;
  inner loops pass ``desc=None`` to stay silent, so nested work never prints a bar per batch.
- Logging is configured once the process group exists (the rank is then known): rank 0 logs at the
  configured level to stderr and, when a run directory is known, to one file per job under
  ``<run_dir>/logs/`` (``job-<id>.log``, ``job-<id>.restart-<n>.log`` after a requeue, ``local-<time>-<pid>.log``
  outside Slurm); the other ranks log warnings and errors only, to stderr, each line prefixed with its rank.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, TypeVar

T = TypeVar("T")

_ENABLED = True


def set_progress(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled


def progress(items: Iterable[T], desc: str | None = None, total: int | None = None, unit: str = "it") -> Iterable[T]:
    from caopd_megatron.runtime.distributed import is_main_rank

    if not (_ENABLED and desc and is_main_rank()):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False, file=sys.stderr)


def close_bar(bar: Iterable) -> None:
    """Close a bar from ``progress`` now (a loop left by an exception); a plain iterable is left alone."""
    close = getattr(bar, "close", None)
    if close is not None:
        close()


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar of ``total`` items on stderr that the caller ``update``s by hand; None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def job_tag() -> str:
    """The name of this job's files under ``<run_dir>/logs``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"job-{job}" + (f".restart-{restart}" if restart not in ("", "0") else "")
    return f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def job_log_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs"


def setup_logging(level: str = "INFO", run_dir: str | Path | None = None, rank: int = 0) -> Path | None:
    """Route this rank's log records (see the module docstring); returns the job's log file, if any."""
    root = logging.getLogger()
    root.setLevel(level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)))
    prefix = f"[rank {rank}] " if rank else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_caopd", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = None
    if run_dir is not None and rank == 0:
        path = job_log_dir(run_dir) / f"{job_tag()}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    for h in handlers:
        h.setFormatter(fmt)
        h._caopd = True  # type: ignore[attr-defined]
        root.addHandler(h)
    return path


class ExperimentTracker:
    """Optional Weights & Biases logging (``logging.wandb=true``), main rank only.

    wandb is not a dependency: asking for it without it installed is a clear error at start-up, not a crash
    mid-run. With no network, set ``WANDB_MODE=offline`` and sync later.
    """

    def __init__(self, enabled: bool, run_dir: str | Path, config: dict) -> None:
        from caopd_megatron.runtime.distributed import is_main_rank

        self.run = None
        if not (enabled and is_main_rank()):
            return
        try:
            import wandb
        except ImportError:
            from caopd_megatron.runtime.backend import BackendError

            raise BackendError("logging.wandb=true needs the wandb package: `pip install wandb` "
                               "(or set logging.wandb=false)") from None
        self.run = wandb.init(project="caopd_megatron", dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)


def record_job(run_dir: str | Path, config_yaml: str) -> None:
    """Write this job's resolved config and launch environment (Slurm variables, host, command line) next to
    its log: ``<run_dir>/logs/<tag>.config.yaml`` and ``<tag>.env.json``. Main rank only."""
    folder = job_log_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tag = job_tag()
    (folder / f"{tag}.config.yaml").write_text(config_yaml)
    launch = {k: v for k, v in sorted(os.environ.items())
              if k.startswith(("SLURM_", "MASTER_", "CUDA_VISIBLE", "OMP_NUM_THREADS", "NCCL_", "TORCH_NCCL_"))}
    record = {"host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv, "started": time.time(),
              "environment": launch}
    (folder / f"{tag}.env.json").write_text(json.dumps(record, indent=1) + "\n")
