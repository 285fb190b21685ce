"""megatron-core's checkpoint writer helper process dies with the job, however the job ends.

Design decisions:
- megatron's ``torch_dist`` writer keeps, for the life of the saving process, a ``multiprocessing`` manager
  (a spawned server process holding its results queue: ~270 MB resident). A job that ends normally shuts it
  down at exit; a job killed with SIGKILL leaves it orphaned, alive for minutes.
- Before the first distributed save we create that manager ourselves, with an initializer that asks Linux
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill it when the job dies, and hand megatron its queue through
  the module global megatron itself caches it in (``filesystem_async._results_queue``; megatron-core 0.16).
  If the job died before the request took effect, the helper exits at once.
- Elsewhere than Linux the request is skipped (the helper then behaves as megatron's own).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

PR_SET_PDEATHSIG = 1
_managers: list[SyncManager] = []  # kept alive for the job's lifetime (a collected manager shuts down)


def die_with_parent(parent_pid: int) -> None:
    """Runs in the helper process: be killed when ``parent_pid`` (the job) dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the job died before the request took effect
        os._exit(0)


def bind_writer_helper_to_job() -> None:
    """Give megatron's writer a results queue whose server process dies with this process (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    _managers.append(manager)
    filesystem_async._results_queue = manager.Queue()
