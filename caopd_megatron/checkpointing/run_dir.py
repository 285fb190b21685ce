"""What a job does with an existing run directory, and keeping its train log consistent with its checkpoints.

Design decisions:
- ``run.existing`` is explicit: ``resume`` (default) continues from the latest complete checkpoint (or from
  step 0 when none is complete yet); ``refuse`` stops with an error if the directory already holds a run;
  ``new`` writes into the first free sibling ``<dir>-2``, ``<dir>-3``, ... Nothing is ever overwritten
  silently. A directory "holds a run" when it has ``checkpoints/`` or ``train_log.jsonl``.
- The choice is made on rank 0 and broadcast, so every rank writes to the same directory.
- ``train_log.jsonl`` is appended at save points only, before the checkpoint is written; on every resume it is
  trimmed to the steps the checkpoint contains (all of them when there is none). So whatever the kill point,
  the log holds each step once. A torn last line (a kill during the append) is dropped with a warning, and
  the trimmed log replaces the old one atomically.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from caopd_megatron.checkpointing.agreement import broadcast_from_rank0, rank_and_world
from caopd_megatron.checkpointing.atomic import replace_text_atomically
from caopd_megatron.checkpointing.format import CHECKPOINTS_DIR

log = logging.getLogger(__name__)

EXISTING_MODES = ("resume", "refuse", "new")
TRAIN_LOG = "train_log.jsonl"


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (``run.existing``); the message says why and what to do."""


def holds_run(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINTS_DIR).is_dir() or (run_dir / TRAIN_LOG).is_file()


def _decide(run_dir: Path, existing: str) -> Path:
    if existing not in EXISTING_MODES:
        raise RunDirectoryError(f"run.existing={existing!r} is not one of {', '.join(EXISTING_MODES)}")
    if existing == "resume" or not holds_run(run_dir):
        return run_dir
    if existing == "refuse":
        raise RunDirectoryError(f"{run_dir} already holds a run (checkpoints/ or {TRAIN_LOG}) and run.existing=refuse; "
                                f"use run.existing=resume to continue it, run.existing=new for a fresh sibling "
                                f"directory, or another run.output_dir")
    n = 2
    while (sibling := run_dir.with_name(f"{run_dir.name}-{n}")).exists():
        n += 1
    sibling.mkdir(parents=True)
    log.warning("%s already holds a run; run.existing=new: this job writes to %s", run_dir, sibling)
    return sibling


def choose_run_dir(run_dir: str | Path, existing: str) -> Path:
    """The directory this job writes to under ``run.existing`` (collective: rank 0 decides)."""
    decided: tuple[str | None, str | None] = (None, None)
    if rank_and_world()[0] == 0:
        try:
            decided = (str(_decide(Path(run_dir), existing)), None)
        except RunDirectoryError as exc:
            decided = (None, str(exc))
    path, reason = broadcast_from_rank0(decided)
    if path is None:
        raise RunDirectoryError(reason)
    return Path(path)


def trim_log(path: Path, step: int) -> None:
    """Keep the entries of steps < ``step`` (those a checkpoint at ``step`` contains); drop torn lines."""
    if not path.is_file():
        return
    keep, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry_step = int(entry["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            torn += 1
            continue
        if entry_step < step:
            keep.append(line)
    if torn:
        log.warning("%s: dropped %d unreadable line(s) (a write interrupted by a kill)", path, torn)
    replace_text_atomically(path, "".join(line + "\n" for line in keep))
