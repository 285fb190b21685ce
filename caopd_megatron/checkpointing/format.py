"""The training-checkpoint directory format: names, ``meta.json``, content hashes, layouts, finding the latest.

Design decisions:
- ``checkpoints/step_000012/`` holds one ``rank_<r>.pt`` per global rank (each saves the shards it owns),
  optionally ``dist/`` (megatron-core copy), and ``meta.json`` (step, layout, config YAML, a sha256 per file,
  ``"complete": true`` last), written after every other file: it is the seal. ``checkpoints/latest`` names one.
- Loads verify each file they read against its hash (a mismatch names the file); version-1 folders (no
  hashes) load with a warning. Finding the latest does not re-hash, so it stays cheap.
- ``latest_checkpoint`` trusts ``latest`` only if it names a complete checkpoint, else takes the complete one
  with the highest step; ``*.tmp-*`` / ``*.old-*`` folders never match ``step_<n>``.
- A layout (world size, TP, PP, CP, EP) comes from the caller's process groups (megatron's
  ``ProcessGroupCollection``; None = no model parallelism), never from globals.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from caopd_megatron.checkpointing.agreement import rank_and_world

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: meta.json records a sha256 per file
READABLE_VERSIONS = (1, 2)
CHECKPOINTS_DIR = "checkpoints"
DIST_DIR = "dist"  # the megatron-core distributed copy inside a checkpoint folder (optional)
LATEST_FILE = "latest"
META_FILE = "meta.json"
HASHES_KEY = "sha256"

STEP_RE = re.compile(r"^step_(\d+)$")
DEBRIS_RE = re.compile(r"^step_\d+\.(?:tmp|old)-\d+$")
LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
               "context_parallel_size", "expert_model_parallel_size")
_LAYOUT_ABBREV = {"world_size": "world_size", "tensor_model_parallel_size": "TP",
                  "pipeline_model_parallel_size": "PP", "context_parallel_size": "CP",
                  "expert_model_parallel_size": "EP"}
_LAYOUT_GROUPS = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
                  "context_parallel_size": "cp", "expert_model_parallel_size": "ep"}
_HASH_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file, tensor or layout at fault."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# --------------------------------------------------------------------------------------------------------
# Layouts


def current_layout(pg_collection: Any | None = None) -> dict[str, int]:
    """This job's layout; ``pg_collection``: megatron's ``ProcessGroupCollection`` (its ``tp``, ``pp``, ``cp``,
    ``ep`` groups; unset ones count as 1) or None for a job without model parallelism."""
    _, world = rank_and_world()
    layout = {k: 1 for k in LAYOUT_KEYS}
    layout["world_size"] = world
    for key, attr in _LAYOUT_GROUPS.items():
        group = getattr(pg_collection, attr, None) if pg_collection is not None else None
        if group is not None:
            layout[key] = int(group.size())
    return layout


def describe_layout(layout: Mapping[str, Any]) -> str:
    return ", ".join(f"{_LAYOUT_ABBREV[k]}={layout.get(k, 1)}" for k in LAYOUT_KEYS)


def same_layout(saved: Mapping[str, Any], current: Mapping[str, int]) -> bool:
    return all(int(saved.get(k, 1)) == current[k] for k in LAYOUT_KEYS)


# --------------------------------------------------------------------------------------------------------
# Content hashes


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (``meta.json`` excepted), keyed by POSIX relative path."""
    return {p.relative_to(folder).as_posix(): sha256_of(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META_FILE}


def verify_files(ckpt: Path, meta: Mapping[str, Any], names: list[str]) -> None:
    """Raise ``CheckpointError`` naming the first of ``names`` whose content differs from ``meta.json``."""
    recorded = meta.get(HASHES_KEY)
    if recorded is None:
        log.warning("%s predates content hashes (format version %s): its files cannot be verified",
                    ckpt, meta.get("format_version"))
        return
    for name in names:
        path = ckpt / name
        want = recorded.get(name)
        if want is None:
            raise CheckpointError(f"{path} has no hash in {ckpt / META_FILE}: the checkpoint was altered after "
                                  f"the save")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if sha256_of(path) != want:
            raise CheckpointError(f"{path} does not match the sha256 recorded in {ckpt / META_FILE}: the file was "
                                  f"modified or corrupted after the save")


def dist_file_names(meta: Mapping[str, Any]) -> list[str]:
    """The recorded files of the distributed copy (relative to the checkpoint folder)."""
    prefix = f"{meta['distributed']}/"
    return sorted(n for n in (meta.get(HASHES_KEY) or {}) if n.startswith(prefix))


# --------------------------------------------------------------------------------------------------------
# meta.json


def build_meta(*, step: int, layout: Mapping[str, int], world: int, has_teacher: bool, distributed: bool,
               saved_at_unix: float, config_yaml: str, hashes: Mapping[str, str]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "layout": dict(layout),
        "rank_files": [rank_file_name(r) for r in range(world)],
        "has_teacher": has_teacher,
        "distributed": DIST_DIR if distributed else None,
        "saved_at_unix": saved_at_unix,
        "config_yaml": config_yaml,
        HASHES_KEY: dict(hashes),
        "complete": True,  # last key, written after every other file
    }


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint, or ``CheckpointError`` saying why ``ckpt`` is not one."""
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: {ckpt} is not a complete checkpoint (interrupted save?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise CheckpointError(f"{meta_path} does not mark the checkpoint complete")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{meta_path} has format_version {meta.get('format_version')!r}; "
                              f"this code reads versions {READABLE_VERSIONS}")
    try:
        world = int(meta["layout"]["world_size"])
        int(meta["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} lacks a valid step/layout: {exc!r}") from exc
    if not isinstance(meta.get(HASHES_KEY, {}), dict):
        raise CheckpointError(f"{meta_path}: '{HASHES_KEY}' must map file names to hashes")
    for r in range(world):
        f = ckpt / rank_file_name(r)
        if not f.is_file() or f.stat().st_size == 0:
            raise CheckpointError(f"{f} is missing or empty: {ckpt} is not a complete checkpoint")
    return meta


def is_complete(ckpt: Path) -> bool:
    try:
        read_meta(ckpt)
    except CheckpointError:
        return False
    return True


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root`` (a run's ``checkpoints/``), by step."""
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = STEP_RE.match(child.name)
            if m and child.is_dir() and is_complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the complete one with the highest step, else None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    latest = root / LATEST_FILE
    if latest.exists():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        # Only a bare step_<n> name is honoured, so a corrupt file cannot point outside the folder.
        if STEP_RE.match(name) and is_complete(root / name):
            return root / name
        log.warning("%s does not name a complete checkpoint (%r); falling back to the newest complete one",
                    latest, name[:80])
    complete = complete_checkpoints(root)
    return complete[-1][1] if complete else None


def resolve_checkpoint(path_or_run_dir: str | Path) -> Path:
    """A ``step_*`` folder as given, or a run directory's latest complete checkpoint."""
    p = Path(path_or_run_dir)
    if (p / META_FILE).exists() or STEP_RE.match(p.name):
        read_meta(p)
        return p
    if (p / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"no complete checkpoint under {p / CHECKPOINTS_DIR}")
        return found
    raise CheckpointError(f"{p} is neither a checkpoint directory (with {META_FILE}) nor a run directory "
                          f"(with {CHECKPOINTS_DIR}/)")
