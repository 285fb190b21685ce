"""Pruning old training checkpoints: best effort, after the new checkpoint and ``latest`` are in place.

Design decisions:
- Runs on rank 0 only, after the save is published; a failure is logged, never raised (the new checkpoint is
  safe either way).
- Only checkpoints at or below the step just written are ranked: the newest ``keep_last`` of them are kept
  (always including the new one). Higher steps are left alone: after a rollback they belong to an abandoned
  lineage whose fate is the user's call. ``keep_last=0`` keeps everything.
- ``meta.json`` is deleted first, so an interrupted removal leaves an incomplete folder (ignored by
  ``latest_checkpoint``), never a complete-looking broken one. Debris of interrupted saves (``*.tmp-*``,
  ``*.old-*``) is removed too: a run directory has one writer, the job itself.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from caopd_megatron.checkpointing.format import DEBRIS_RE, META_FILE, complete_checkpoints

log = logging.getLogger(__name__)


def remove_checkpoint(path: Path) -> None:
    meta = path / META_FILE
    if meta.exists():
        meta.unlink()
    shutil.rmtree(path)


def prune(root: Path, keep_last: int, just_written: Path, step: int) -> None:
    """Remove debris and all but the newest ``keep_last`` complete checkpoints at or below ``step``."""
    try:
        for child in root.iterdir():
            if DEBRIS_RE.match(child.name) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
        if keep_last <= 0:
            return
        lineage = [(s, p) for s, p in complete_checkpoints(root) if s <= step and p != just_written]
        for _, path in lineage[:max(len(lineage) - (keep_last - 1), 0)]:
            log.info("pruning checkpoint %s (keep_last=%d)", path, keep_last)
            remove_checkpoint(path)
    except OSError as exc:
        log.warning("pruning old checkpoints in %s failed (the new checkpoint is safe): %s", root, exc)
