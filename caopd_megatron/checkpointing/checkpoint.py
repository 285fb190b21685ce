"""Crash-safe training checkpoints: save, load and resume (student, teacher, optimizer, schedule, RNG, data).

Design decisions:
- Collective, and each phase ends in a cross-rank agreement (``agreement.py``): a failure anywhere is a
  ``CheckpointError`` everywhere. Save: rank files -> (``dist/``) -> rank 0 hashes, writes ``meta.json``, renames
  the folder into place, replaces ``latest``, prunes. A crash leaves the old ``latest`` or the new one.
- Load validates before it mutates (hashes, layout, keys, shapes, optimizer state); RNG streams last.
- Two formats stay: per-rank files are the exact, communication-free resume (RNG streams and the distributed
  optimizer's ranges exist only per rank); ``dist/`` (``checkpoint.distributed``) is the only one that reshards
  to another layout, at the cost of megatron's collective writer. A layout change reads ``dist/`` or is refused.
- Process groups are arguments (megatron's ``ProcessGroupCollection``), never read from globals.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caopd_megatron.checkpointing.agreement import agreed, broadcast_from_rank0, rank_and_world
from caopd_megatron.checkpointing.atomic import (fsync_dir, install_directory, replace_text_atomically,
                                                 write_bytes_durably, write_durably)
from caopd_megatron.checkpointing.format import (CHECKPOINTS_DIR, DIST_DIR, LATEST_FILE, META_FILE,
                                                 CheckpointError, build_meta, current_layout, describe_layout,
                                                 dist_file_names, hash_files, latest_checkpoint, rank_file_name,
                                                 read_meta, resolve_checkpoint, same_layout, step_dir_name,
                                                 verify_files)
from caopd_megatron.checkpointing.payload import (PAYLOAD_VERSION, check_optimizer, check_savable, check_state_dict,
                                                  read_rank_file)
from caopd_megatron.checkpointing.pruning import prune
from caopd_megatron.checkpointing.rng import capture_rng, restore_rng
from caopd_megatron.runtime.fault_injection import kill_point

__all__ = ["CheckpointError", "TrainState", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the trainer hands to ``save_checkpoint`` and gets back from ``load_checkpoint``.

    ``data_position`` and ``metadata`` must hold plain Python values (dict/list/tuple/str/int/float/bool/None)
    or tensors: the loader only accepts what ``torch.load(weights_only=True)`` can rebuild.
    """

    step: int
    data_position: dict
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "data_position": self.data_position, "metadata": self.metadata}


# --------------------------------------------------------------------------------------------------------
# Saving


def _save_failure(step: int, final: Path, rank: int, failed: list[int], error: Exception | None) -> CheckpointError:
    if error is not None:
        err = CheckpointError(f"saving checkpoint step {step} to {final} failed on rank {rank}: "
                              f"{type(error).__name__}: {error}; `latest` is unchanged")
        err.__cause__ = error
        return err
    return CheckpointError(f"saving checkpoint step {step} to {final} failed on rank(s) {failed} (see their "
                           f"logs); `latest` is unchanged")


def save_checkpoint(run_dir: str | Path, step: int, *, student: nn.Module,
                    optimizer: torch.optim.Optimizer | None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    teacher: nn.Module | None, state: TrainState, config_yaml: str, keep_last: int = 2,
                    distributed: bool = False, pg_collection: Any | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_<step>/`` atomically, point ``latest`` at it, prune old ones.

    Collective: every rank calls it; each writes its own ``rank_<r>.pt``. ``distributed``: also write the
    layout-independent megatron-core copy (``dist/``) that a run with another layout resumes from.
    ``pg_collection``: the job's process groups (megatron ``ProcessGroupCollection``; None = no model
    parallelism). Refuses (on every rank) a state holding non-finite values. Returns the checkpoint directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if state.step != step:
        raise ValueError(f"step={step} but state.step={state.step}; they name the same training step")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    if not isinstance(config_yaml, str):
        raise TypeError(f"config_yaml must be the resolved config as a YAML string, got {type(config_yaml).__name__}")

    rank, world = rank_and_world()
    layout = current_layout(pg_collection)
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    token = broadcast_from_rank0(os.getpid())  # every rank picks the same temp folder
    tmp = root / f"{final.name}.tmp-{token}"
    describe = partial(_save_failure, step, final, rank)

    def remove_tmp() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_rank_file() -> None:
        payload = {"format_version": PAYLOAD_VERSION, "rank": rank, "layout": layout, "step": step,
                   "student": student.state_dict(),
                   "teacher": teacher.state_dict() if teacher is not None else None,
                   "optimizer": optimizer.state_dict() if optimizer is not None else None,
                   "scheduler": scheduler.state_dict() if scheduler is not None else None,
                   "rng": capture_rng(), "train_state": state.as_dict()}
        check_savable(payload, step)
        tmp.mkdir(parents=True, exist_ok=True)
        write_durably(tmp / rank_file_name(rank), lambda f: torch.save(payload, f))

    def write_distributed_copy() -> None:
        # Imported here: megatron-core is heavy and only this optional copy needs it.
        from caopd_megatron.checkpointing.distributed_checkpoint import save_distributed

        save_distributed(tmp / DIST_DIR, student=student, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                         metadata={"train_state": state.as_dict()})

    def publish() -> None:
        if rank != 0:
            return
        missing = [rank_file_name(r) for r in range(world) if not (tmp / rank_file_name(r)).is_file()]
        if missing:
            raise CheckpointError(f"rank files {missing} did not appear in {tmp}: run_dir must be on a "
                                  f"filesystem shared by all ranks")
        meta = build_meta(step=step, layout=layout, world=world, has_teacher=teacher is not None,
                          distributed=distributed, saved_at_unix=time.time(), config_yaml=config_yaml,
                          hashes=hash_files(tmp))
        write_bytes_durably(tmp / META_FILE, json.dumps(meta, indent=2).encode("utf-8"))
        fsync_dir(tmp)
        install_directory(tmp, final, token)
        kill_point("save:installed")
        replace_text_atomically(root / LATEST_FILE, final.name + "\n")

    agreed(write_rank_file, describe, remove_tmp)
    if distributed:
        agreed(write_distributed_copy, describe, remove_tmp)
    kill_point("save:rank_files_written")
    agreed(publish, describe, remove_tmp)
    kill_point("save:latest_updated")
    if rank == 0:
        prune(root, keep_last, final, step)
    log.info("saved checkpoint %s (rank %d of %d)", final, rank, world)
    return final


# --------------------------------------------------------------------------------------------------------
# Loading


def _load_failure(ckpt: Path, what: str, failed: list[int], error: Exception | None) -> CheckpointError:
    if isinstance(error, CheckpointError):
        return error
    if error is not None:  # a well-formed zip with a malformed payload
        err = CheckpointError(f"{ckpt}: {what} failed: {type(error).__name__}: {error}")
        err.__cause__ = error
        return err
    return CheckpointError(f"loading {ckpt} failed on rank(s) {failed} (see their logs) while {what}")


def _validate(ckpt: Path, meta: dict[str, Any], rank: int, student: nn.Module, optimizer: Any | None,
              scheduler: Any | None, teacher: nn.Module | None) -> dict[str, Any]:
    source = ckpt / rank_file_name(rank)
    verify_files(ckpt, meta, [rank_file_name(rank)])
    payload = read_rank_file(source, rank)
    if payload["layout"] != meta["layout"] or payload["step"] != meta["step"]:
        raise CheckpointError(f"{source} does not belong to {ckpt / META_FILE} (step/layout differ)")
    check_state_dict(payload["student"], student, "student", source)
    if teacher is not None and payload["teacher"] is not None:
        check_state_dict(payload["teacher"], teacher, "teacher", source)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"{source} holds no optimizer state but an optimizer was passed to load into")
        check_optimizer(payload["optimizer"], optimizer, source)
    if scheduler is not None and payload["scheduler"] is None:
        raise CheckpointError(f"{source} holds no LR-scheduler state but a scheduler was passed to load into")
    return payload


def _apply(payload: dict[str, Any], source: Path, student: nn.Module, optimizer: Any | None,
           scheduler: Any | None, teacher: nn.Module | None, restore_rng_streams: bool) -> None:
    try:
        student.load_state_dict(payload["student"], strict=True)
        if teacher is not None:
            if payload["teacher"] is not None:
                teacher.load_state_dict(payload["teacher"], strict=True)
            else:
                log.warning("%s holds no teacher weights; the teacher passed in keeps the weights it was built "
                            "with (right for a frozen teacher, wrong for an EMA one)", source)
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: restoring state failed: {exc}") from exc
    # Last, so nothing above can consume random numbers after the streams are restored.
    if restore_rng_streams:
        try:
            restore_rng(payload["rng"], source)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: RNG state is malformed: {exc!r}") from exc


def _resolve_on_rank0(path_or_run_dir: str | Path) -> Path:
    """Rank 0 resolves the directory so a concurrent ``latest`` update cannot send ranks to different steps."""
    resolved: tuple[str | None, str | None] = (None, None)
    if rank_and_world()[0] == 0:
        try:
            resolved = (str(resolve_checkpoint(path_or_run_dir)), None)
        except CheckpointError as exc:
            resolved = (None, str(exc))
    ckpt_str, reason = broadcast_from_rank0(resolved)
    if ckpt_str is None:
        raise CheckpointError(reason or f"cannot resolve a checkpoint from {path_or_run_dir}")
    return Path(ckpt_str)


def load_checkpoint(path_or_run_dir: str | Path, *, student: nn.Module, optimizer: Any | None = None,
                    scheduler: Any | None = None, teacher: nn.Module | None = None, restore_rng: bool = True,
                    pg_collection: Any | None = None) -> TrainState:
    """Restore a checkpoint (a ``step_*`` directory, or a run directory's latest) into the given objects.

    Collective: every rank calls it and reads its own ``rank_<r>.pt`` (or, under another layout, the
    distributed copy). Everything is verified on every rank before anything is modified. Returns the
    saved ``TrainState``.
    """
    rank, _ = rank_and_world()
    ckpt = _resolve_on_rank0(path_or_run_dir)
    meta = read_meta(ckpt)
    current = current_layout(pg_collection)
    if not same_layout(meta["layout"], current):
        if not meta.get("distributed"):
            raise CheckpointError(
                f"checkpoint {ckpt} was written with layout ({describe_layout(meta['layout'])}) but this run has "
                f"layout ({describe_layout(current)}) and it has no distributed copy to reshard from (save with "
                f"checkpoint.distributed=true) - resume with the original world size and parallel sizes")
        return _load_resharded(ckpt, meta, current, student, optimizer, scheduler, teacher, pg_collection)

    source = ckpt / rank_file_name(rank)
    payload = agreed(lambda: _validate(ckpt, meta, rank, student, optimizer, scheduler, teacher),
                     partial(_load_failure, source, "validating the checkpoint"))
    agreed(lambda: _apply(payload, source, student, optimizer, scheduler, teacher, restore_rng),
           partial(_load_failure, source, "restoring state"))
    ts = payload["train_state"]
    log.info("loaded checkpoint %s (rank %d, step %d)", ckpt, rank, ts["step"])
    return TrainState(step=int(ts["step"]), data_position=ts["data_position"], metadata=ts["metadata"])


def _load_resharded(ckpt: Path, meta: dict[str, Any], current: dict[str, int], student: nn.Module,
                    optimizer: Any | None, scheduler: Any | None, teacher: nn.Module | None,
                    pg_collection: Any | None) -> TrainState:
    """Resume from the checkpoint's distributed copy under this run's (different) layout. Collective."""
    # Imported here: megatron-core is heavy and only a layout change needs it.
    from caopd_megatron.checkpointing.distributed_checkpoint import DistributedCheckpointError, load_distributed

    def verify() -> None:
        if rank_and_world()[0] == 0:
            verify_files(ckpt, meta, dist_file_names(meta))

    agreed(verify, partial(_load_failure, ckpt, "verifying the distributed copy"))
    try:
        saved = load_distributed(ckpt / meta["distributed"], student=student, teacher=teacher, optimizer=optimizer,
                                 scheduler=scheduler, pg_collection=pg_collection)
    except DistributedCheckpointError as exc:
        raise CheckpointError(f"{ckpt}: resharding from layout ({describe_layout(meta['layout'])}) to "
                              f"({describe_layout(current)}) failed: {exc}") from exc
    ts = saved["train_state"]
    log.warning("resharded checkpoint %s from layout (%s) to (%s); RNG streams are per rank and were not restored",
                ckpt, describe_layout(meta["layout"]), describe_layout(current))
    return TrainState(step=int(ts["step"]), data_position=ts["data_position"], metadata=ts["metadata"])
