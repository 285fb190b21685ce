"""Named kill points for crash tests: ``CAOPD_KILL_AT=<point>[@<n>]`` ends the process at that point.

Design decisions:
- A test sets the variable and runs a real job; at the n-th time (default 1st) the named point is reached the
  process calls ``os._exit(KILLED_STATUS)``: no ``finally`` blocks, no atexit handlers, no flushing, exactly
  like ``kill -9`` at that line. Unset (every real run), a point costs one dictionary lookup.
- Points sit only at phase boundaries of saves and of the run loop, never in a step's hot path. The points
  are listed in ``KILL_POINTS`` so a typo in a test is an error, not a test that silently never kills.
"""
from __future__ import annotations

import os

KILL_ENV = "CAOPD_KILL_AT"
KILLED_STATUS = 86
KILL_POINTS = (
    "save:rank_files_written",  # every rank file of the new checkpoint is on disk, meta.json not yet
    "save:installed",  # the checkpoint folder is in place, ``latest`` still names the previous one
    "save:latest_updated",  # ``latest`` names the new checkpoint, older ones not yet pruned
    "run:log_written",  # train_log.jsonl holds steps the next checkpoint will contain; that save has not begun
)
_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """End the process here if ``CAOPD_KILL_AT`` names this point (and this is its n-th visit)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point not in KILL_POINTS:
        raise ValueError(f"{KILL_ENV}={wanted!r}: unknown kill point; known: {', '.join(KILL_POINTS)}")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os._exit(KILLED_STATUS)
