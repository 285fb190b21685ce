"""Crash-safe writes: a file or a directory is either absent, the old version, or complete.

Design decisions:
- Files are written then ``fsync``ed; a replaced file goes through a temp file and ``os.replace`` (atomic on
  POSIX), then the parent directory is fsynced so the rename itself survives a power cut.
- A directory is installed by renaming a fully written temp directory into place. A rename cannot replace a
  non-empty directory, so an existing one is first moved aside (``<name>.old-<pid>``) and put back if the
  second rename fails; the aside copy is removed afterwards (a crash in between leaves it as debris, which
  never matches the checkpoint name pattern).
- Nothing here knows about checkpoints: ``format.py`` decides names, ``checkpoint.py`` the order of writes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: Path) -> None:
    """Make renames/creations inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durably(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create ``path`` with ``write(file)`` and fsync it before returning."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_durably(path: Path, data: bytes) -> None:
    write_durably(path, lambda f: f.write(data))


def replace_text_atomically(path: Path, text: str) -> None:
    """Readers of ``path`` see the old text or the new one, never a mix."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write_bytes_durably(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def install_directory(tmp: Path, final: Path, token: int) -> None:
    """Rename the complete directory ``tmp`` to ``final``, replacing an existing ``final``."""
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    aside = final.with_name(f"{final.name}.old-{token}")
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
