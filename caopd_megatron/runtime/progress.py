"""Progress bars and logging set-up shared by every phase.

Design decisions:
- tqdm bars only on the main rank and only when enabled (``logging.progress``) and a description is given;
  inner loops pass ``desc=None`` to stay silent, so nested work never prints a bar per batch.
- Logging goes to stderr and, when a run directory is known, to ``<run_dir>/log.txt`` as well.
"""
from __future__ import annotations

import logging
import sys
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


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar of ``total`` items on stderr that the caller ``update``s by hand; None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def setup_logging(level: str = "INFO", run_dir: str | Path | None = None) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_caopd", False):
            root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        h._caopd = True  # type: ignore[attr-defined]
        root.addHandler(h)


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
