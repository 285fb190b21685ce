"""Cross-rank agreement: a phase of a collective operation succeeds on every rank or fails on every rank.

Design decisions:
- Instead of bare barriers, each phase ends with an all-reduce of a per-rank failure vector over the job's
  default (world) group, so a failure on one rank makes every rank raise (naming the failing ranks) instead
  of leaving the others blocked in the next collective. The all-reduce doubles as the phase's barrier.
- Written once: ``agreed(work, ...)`` runs ``work`` on this rank, agrees, and raises the error built by
  ``describe(failed_ranks, local_error)`` on every rank if any failed. Checkpoint saves and loads use it
  for each of their phases.
- Only ``Exception`` is caught: a ``BaseException`` (a kill, ``KeyboardInterrupt``) is not a phase failure
  and propagates untouched, like the process dying would.
- No process group at all (a single process, dist not initialised) is world size 1 and needs no traffic.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's world size (0, 1 without a process group)."""
    if dist_on():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; every other backend here (gloo) takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failed_ranks(failed_here: bool) -> list[int]:
    """Every rank learns which ranks failed the phase just finished (collective over the world group)."""
    rank, world = rank_and_world()
    if not dist_on():
        return [0] if failed_here else []
    flags = torch.zeros(world, dtype=torch.int32, device=_collective_device())
    flags[rank] = int(failed_here)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value; local pickling only, never read from a file)."""
    if not dist_on() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(work: Callable[[], T], describe: Callable[[list[int], Exception | None], Exception],
           on_failure: Callable[[], None] | None = None) -> T | None:
    """Run ``work`` here; if it raised on any rank, call ``on_failure`` and raise ``describe(failed, error)``
    on every rank (``error``: this rank's exception, or None when only other ranks failed)."""
    error: Exception | None = None
    result = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = exc
    failed = failed_ranks(error is not None)
    if failed:
        if on_failure is not None:
            on_failure()
        raise describe(failed, error)
    return result
