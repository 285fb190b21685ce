"""Stop requests (a scheduler's signal, a person's Ctrl-C, the job's time budget) turned into an agreed stop.

Design decisions:
- A signal handler only records the signal; nothing is saved or logged inside it. The training loop asks
  ``StopGuard.agreed_stop`` at every step boundary: one all-reduce MAX of a small code over the world group,
  so every rank stops after the same step even if the signal reached only some of them (or at different
  times), and the loop saves one checkpoint and exits with ``EXIT_INTERRUPTED``.
- A time budget (``run.max_minutes_per_job``) stops at the first boundary where the elapsed time plus the
  longest step seen so far would pass the budget, so the job saves before the wall clock kills it.
- A loop that does not checkpoint (``caopd demo``) unwinds instead: ``raise_if_stopping`` raises
  ``StopRequested`` at the boundary, whose message the command line prints as one line (exit 75).
- A second SIGINT raises ``KeyboardInterrupt`` at once (a person who presses Ctrl-C twice means it).
- The loop exits with ``EXIT_INTERRUPTED`` (75, ``runtime/exit_codes.py``) so a batch script can requeue.
  Ranks leave a deliberate non-zero exit together (``leave_together``): with ``srun --kill-on-bad-exit`` the
  first rank to exit non-zero gets the others sent SIGTERM, which would turn their 75 into 143.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Callable

import torch
import torch.distributed as dist

from caopd_megatron.config.loader import ConfigError
from caopd_megatron.runtime.exit_codes import StopRequested

log = logging.getLogger(__name__)

# The agreed code: 0 nothing, TIME_BUDGET the budget, otherwise the signal number (MAX keeps a signal over the
# budget, so the log names what the scheduler sent).
NO_STOP = 0
TIME_BUDGET = 1


def parse_signal(name: str) -> signal.Signals:
    """``SIGTERM``, ``TERM`` or ``15`` -> ``signal.SIGTERM``; ``ConfigError`` naming the input otherwise."""
    text = str(name).strip().upper()
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(f"key 'run.stop_signals': {name!r} is not a signal name") from None


def describe_stop(code: int) -> str:
    if code == TIME_BUDGET:
        return "time budget (run.max_minutes_per_job) reached"
    return f"{signal.Signals(code).name} received"


class StopGuard:
    """Signal handlers + time budget; ``agreed_stop()`` at each step boundary returns the world's verdict.

    Use as a context manager: the previous handlers are restored on exit, so tests and the embedded default
    can run several jobs in one process.
    """

    def __init__(self, signals: list[str], max_minutes: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.signals = [parse_signal(s) for s in signals]
        self.budget_s = 60.0 * max_minutes
        self.clock = clock
        self.started = clock()
        self.last_boundary = self.started
        self.longest_step_s = 0.0
        self.received: int = NO_STOP
        self.previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopGuard":
        for sig in self.signals:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self.previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = max(self.received, signum)

    def local_code(self) -> int:
        """This rank's stop code now (no communication); also measures the step that just ended."""
        now = self.clock()
        self.longest_step_s = max(self.longest_step_s, now - self.last_boundary)
        self.last_boundary = now
        if self.received:
            return self.received
        if self.budget_s and now - self.started + self.longest_step_s >= self.budget_s:
            return TIME_BUDGET
        return NO_STOP

    def agreed_stop(self) -> int:
        """Collective over the world group (every rank, every step boundary): the MAX of the ranks' codes."""
        code = self.local_code()
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            flag = torch.tensor([code], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return code

    def raise_if_stopping(self) -> None:
        """``agreed_stop`` (collective) for loops that unwind: raises ``StopRequested`` on a stop."""
        code = self.agreed_stop()
        if code != NO_STOP:
            raise StopRequested(code, describe_stop(code))


def leave_together() -> None:
    """Before every rank exits with the same deliberate non-zero code: ignore SIGTERM, then meet (collective).

    No rank can exit before all have passed the barrier, and by then all ignore the SIGTERM that srun's
    ``--kill-on-bad-exit`` sends to the ranks still running when the first one exits.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
