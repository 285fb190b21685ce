"""The process exit codes of ``caopd`` (the contract a batch script reads, README "Running on Slurm") and the
phase-order exceptions that map to them.

Design decisions:
- 0 done what was asked (distill.steps reached, run.max_steps_per_job done, or nothing left); 1 a crash;
  2 a user error (bad input, impossible layout, the run directory locked by another live job: do not retry);
  3 a phase found the run complete (a phase loop's stop condition); 4 training diverged (a non-finite loss
  or gradient norm stopped the step before the update; nothing was applied or saved); 75 interrupted by a signal or the time
  budget after a checkpoint was written (resubmit or requeue to continue; sysexits' EX_TEMPFAIL), or, for
  ``caopd demo``, which keeps no checkpoint, stopped at a step boundary with every finished stage's files
  complete (rerun to start over); 130 a second Ctrl-C (nothing saved since the last checkpoint).
- No dependencies, so the command line can read them before torch is imported.
"""
from __future__ import annotations

EXIT_DONE = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_NOTHING_TO_DO = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 75
EXIT_KEYBOARD_INTERRUPT = 130


class NothingLeftToDo(Exception):
    """The run has reached ``distill.steps``: a phase has no step to work on (``EXIT_NOTHING_TO_DO``)."""


class PhaseOrderError(ValueError):
    """A phase asked for a step other than the one the run directory's checkpoint is at (``EXIT_USER_ERROR``)."""


class StopRequested(Exception):
    """A stop signal reached a loop that unwinds rather than saves (``caopd demo``; ``runtime/preemption.py``
    raises it at a step boundary every rank agreed on): ``EXIT_INTERRUPTED``. ``code`` is the agreed stop code
    (a signal number); the message is the one line the command line prints."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)
