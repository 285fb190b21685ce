"""Crash-safe training checkpoints: student, teacher, optimizer, LR schedule, RNG streams and data position.

Design decisions:
- Layout: ``run_dir/checkpoints/step_000012/`` holds one ``rank_00000.pt`` per global rank (each rank saves
  the shards it owns, so TP/PP runs need no gather and no rank ever holds the full model) and a
  ``meta.json`` (step, layout, resolved config YAML, rank file names; ``"complete": true`` is its last key and
  the file is written after every rank file is on disk). ``run_dir/checkpoints/latest`` is a one-line text
  file naming the directory.
- Atomicity: ranks write into ``step_000012.tmp-<pid of rank 0>/`` (the pid is broadcast so every rank picks
  the same folder) and fsync their file; rank 0 then writes ``meta.json``, fsyncs, renames the folder into
  place, and only then replaces ``latest`` through a temp file + ``os.replace``. A crash at any point leaves
  either the old ``latest`` or the new one, never a half-written checkpoint behind it. Re-saving an existing
  step moves the old folder aside first (a directory rename cannot replace a non-empty directory).
- Multi-rank agreement: instead of bare barriers, each phase ends with an all-reduce of a per-rank failure
  vector, so a failure on one rank makes every rank raise ``CheckpointError`` (naming the failing ranks)
  instead of leaving the others blocked in the next collective. ``save_checkpoint`` and ``load_checkpoint``
  are therefore collective: every rank must call them. ``run_dir`` must be on a filesystem all ranks see;
  rank 0 checks that every rank's file arrived before publishing.
- ``latest_checkpoint`` trusts ``latest`` only when it names a complete checkpoint (meta.json parses, says
  complete, all rank files exist); otherwise it falls back to the complete checkpoint with the highest step.
  ``*.tmp-*`` / ``*.old-*`` folders never match the ``step_<n>`` pattern, so they never count; rank 0 deletes
  such debris after the next successful save (a run directory has one writer, the job itself).
- Pruning runs after the new checkpoint and ``latest`` are in place, on rank 0, and is best effort (a failure
  is logged: the checkpoint itself is safe). It ranks only checkpoints at or below the step just written,
  keeps the newest ``keep_last`` of them (always including the new one) and leaves higher steps alone: after
  a rollback those belong to an abandoned lineage whose fate is the user's call. ``meta.json`` is deleted
  first so a pruning interrupted midway leaves an incomplete folder, never a complete-looking broken one.
  ``keep_last=0`` keeps everything.
- Optimizers: a torch optimizer's ``state_dict()`` is stored as is. megatron's distributed optimizer
  (``parallel/distributed_optimizer.py``) holds only this DP rank's ranges of the Adam state, which megatron's
  own ``state_dict()`` omits; its wrapper's ``state_dict()`` adds them (this rank's ranges as plain tensors,
  no communication) and validates a saved one through ``check_state_dict``, so per-rank files never drop
  them. A checkpoint written with one kind of optimizer is refused (with a message) by the other.
- Loading never unpickles code: ``torch.load(..., weights_only=True, map_location="cpu")``. Everything saved
  is tensors or plain Python values; python ``random``'s state is stored as a JSON-able dict, numpy's legacy
  global state (only when numpy is imported) as a tensor plus scalars, torch CPU/CUDA states as byte tensors,
  megatron-core's model-parallel RNG tracker (only when megatron-core is imported and the tracker exists) as
  named tensors. Payloads are checked at save time, so a value ``weights_only`` would refuse (a numpy scalar
  in ``metadata``, say) fails the save with its path named, not a resume weeks later.
- Loading validates before it mutates: layout (world size, TP, PP, CP, EP), state-dict keys and shapes,
  optimizer group sizes and per-parameter state shapes are checked on every rank, the ranks agree, and only
  then are weights, optimizer, scheduler and RNG streams restored. Every problem is a ``CheckpointError``
  naming the file, tensor or both layouts.
- Resharding: with ``distributed=True`` a save also writes a megatron-core distributed copy (``dist/``, see
  ``distributed_checkpoint.py``: global keys, any layout can read it) inside the same atomically installed
  folder. Loading a checkpoint whose layout (world size, TP, PP, CP, EP) differs from the run's routes to
  that copy (weights, teacher, optimizer moments, LR schedule, train state; RNG streams are per rank and are
  not restored across layouts); without it the mismatch is refused with both layouts named. The per-rank
  files stay the fast path for same-layout resumes.
- Megatron-core is never imported by this module; its parallel state and RNG tracker are consulted only if
  the process has already imported them (so plain-torch tests and tools stay light).
- The teacher is optional on both sides: saved when given; on load, a checkpoint without teacher weights
  leaves the passed teacher as built (a frozen teacher is rebuilt), with a warning since an EMA teacher
  would then restart from its initial weights.
"""
from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
DIST_DIR = "dist"  # the megatron-core distributed copy inside a checkpoint folder (optional)
LATEST_FILE = "latest"
META_FILE = "meta.json"

_STEP_RE = re.compile(r"^step_(\d+)$")
_DEBRIS_RE = re.compile(r"^step_\d+\.(?:tmp|old)-\d+$")
_LAYOUT_KEYS = ("world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "expert_model_parallel_size")
_LAYOUT_ABBREV = {"world_size": "world_size", "tensor_model_parallel_size": "TP",
                  "pipeline_model_parallel_size": "PP", "context_parallel_size": "CP",
                  "expert_model_parallel_size": "EP"}
# Optimizer state entries that are elementwise companions of their parameter (same shape). Other entries
# (scalars, factored second moments) are not shape-checked.
_ELEMENTWISE_OPT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                          "acc_delta", "sum", "ax", "prev", "main_param")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file, tensor or layout at fault."""


@dataclass
class TrainState:
    """What the trainer hands to ``save_checkpoint`` and gets back from ``load_checkpoint``.

    ``data_position`` and ``metadata`` must hold plain Python values (dict/list/tuple/str/int/float/bool/None)
    or tensors: the loader only accepts what ``torch.load(weights_only=True)`` can rebuild.
    """

    step: int
    data_position: dict
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Names and small filesystem helpers


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames/creations durable; not every platform allows opening a directory.
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


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _replace_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        _write_bytes_durably(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _remove_tree(path: Path) -> None:
    # Drop meta.json first: an interrupted removal then leaves an incomplete folder, which is ignored.
    meta = path / META_FILE
    if meta.exists():
        meta.unlink()
    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------------
# Distributed helpers (all no-ops in a single process)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _dist_on():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; every other backend here (gloo) takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed_ranks(failed_here: bool) -> list[int]:
    """Every rank learns which ranks failed the phase just finished (doubles as the phase barrier)."""
    rank, world = _rank_world()
    if world == 1 and not _dist_on():
        return [0] if failed_here else []
    flags = torch.zeros(world, dtype=torch.int32, device=_collective_device())
    flags[rank] = int(failed_here)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]


def _broadcast_from_rank0(value: int) -> int:
    if not _dist_on():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def _broadcast_object_from_rank0(obj: Any) -> Any:
    if not _dist_on() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _current_layout() -> dict[str, int]:
    _, world = _rank_world()
    layout = {k: 1 for k in _LAYOUT_KEYS}
    layout["world_size"] = world
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        layout["tensor_model_parallel_size"] = int(ps.get_tensor_model_parallel_world_size())
        layout["pipeline_model_parallel_size"] = int(ps.get_pipeline_model_parallel_world_size())
        getters = {"context_parallel_size": "get_context_parallel_world_size",
                   "expert_model_parallel_size": "get_expert_model_parallel_world_size"}
        for key, getter in getters.items():
            fn = getattr(ps, getter, None)
            if fn is not None:
                layout[key] = int(fn())
    return layout


def _describe_layout(layout: Mapping[str, Any]) -> str:
    return ", ".join(f"{_LAYOUT_ABBREV[k]}={layout.get(k, 1)}" for k in _LAYOUT_KEYS)


def _same_layout(saved: Mapping[str, Any], current: Mapping[str, int]) -> bool:
    return all(int(saved.get(k, 1)) == current[k] for k in _LAYOUT_KEYS)


def _check_layout(ckpt: Path, saved: Mapping[str, Any], current: Mapping[str, int]) -> None:
    # Reached only without a distributed copy (``load_checkpoint`` routes mismatches to it when present).
    if not _same_layout(saved, current):
        raise CheckpointError(
            f"checkpoint {ckpt} was written with layout ({_describe_layout(saved)}) but this run has layout "
            f"({_describe_layout(current)}) and it has no distributed copy to reshard from (save with "
            f"checkpoint.distributed=true) - resume with the original world size and parallel sizes")


# --------------------------------------------------------------------------------------------------------
# What weights_only can rebuild

_ATOMS: tuple[type, ...] = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                            torch.Size)


def _check_loadable(obj: Any, where: str) -> None:
    """Raise ``CheckpointError`` naming the first value ``torch.load(weights_only=True)`` would refuse."""
    kind = type(obj)
    # Exact type checks: subclasses such as numpy.float64 (a float) or IntEnum members pickle as their own
    # class, which the weights_only unpickler refuses.
    if kind in (torch.Tensor, nn.Parameter) or kind in _ATOMS:
        return
    if kind in (list, tuple, set):
        for i, item in enumerate(obj):
            _check_loadable(item, f"{where}[{i}]")
        return
    if kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _check_loadable(key, f"{where} key {key!r}")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) cannot "
        f"rebuild; store plain Python values (dict/list/tuple/str/int/float/bool/None) or tensors")


# --------------------------------------------------------------------------------------------------------
# RNG streams


def _megatron_rng_tracker() -> Any | None:
    rnd = sys.modules.get("megatron.core.tensor_parallel.random")
    # Asking for the tracker before megatron created one would create a default one and pin its type.
    if rnd is None or not getattr(rnd, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    return rnd.get_cuda_rng_tracker()


def _capture_rng() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    rng: dict[str, Any] = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "torch_cpu": torch.get_rng_state(),
    }
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        rng["numpy"] = {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    # An uninitialised CUDA context has only the lazily queued seed, which the caller's seeding recreates;
    # querying it would initialise CUDA on every visible device.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    tracker = _megatron_rng_tracker()
    if tracker is not None:
        states = {}
        for name, state in tracker.get_states().items():
            # Cuda-graph-safe trackers keep torch.Generator objects rather than state tensors.
            states[str(name)] = (state.get_state() if isinstance(state, torch.Generator) else state).detach().cpu()
        if states:
            rng["megatron_tracker"] = states
    return rng


def _restore_rng(rng: Mapping[str, Any], source: Path) -> None:
    py = rng["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    torch.set_rng_state(rng["torch_cpu"])
    if "numpy" in rng:
        np = importlib.import_module("numpy")
        s = rng["numpy"]
        np.random.set_state((s["bit_generator"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "torch_cuda" in rng:
        if torch.cuda.is_available():
            states = rng["torch_cuda"]
            n = torch.cuda.device_count()
            if len(states) != n:
                log.warning("%s holds CUDA RNG states for %d devices, this process sees %d; restoring the first %d",
                            source, len(states), n, min(n, len(states)))
            for i, state in enumerate(states[:n]):
                torch.cuda.set_rng_state(state, i)
        else:
            log.warning("%s holds CUDA RNG states but CUDA is not available here; they are not restored", source)
    if "megatron_tracker" in rng:
        tracker = _megatron_rng_tracker()
        if tracker is None:
            log.warning("%s holds megatron-core model-parallel RNG states but no tracker exists in this process "
                        "(seed megatron-core before loading); they are not restored", source)
        else:
            live = tracker.get_states()
            restored = {}
            for name, state in rng["megatron_tracker"].items():
                if isinstance(live.get(name), torch.Generator):
                    live[name].set_state(state)
                    restored[name] = live[name]
                else:
                    restored[name] = state
            tracker.set_states(restored)


# --------------------------------------------------------------------------------------------------------
# Finding checkpoints


def _read_meta(ckpt: Path) -> dict[str, Any]:
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
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format_version {meta.get('format_version')!r}; "
                              f"this code reads version {FORMAT_VERSION}")
    try:
        world = int(meta["layout"]["world_size"])
        int(meta["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path} lacks a valid step/layout: {exc!r}") from exc
    for r in range(world):
        f = ckpt / rank_file_name(r)
        if not f.is_file() or f.stat().st_size == 0:
            raise CheckpointError(f"{f} is missing or empty: {ckpt} is not a complete checkpoint")
    return meta


def _is_complete(ckpt: Path) -> bool:
    try:
        _read_meta(ckpt)
    except CheckpointError:
        return False
    return True


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _STEP_RE.match(child.name)
            if m and child.is_dir() and _is_complete(child):
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
        if _STEP_RE.match(name) and _is_complete(root / name):
            return root / name
        log.warning("%s does not name a complete checkpoint (%r); falling back to the newest complete one",
                    latest, name[:80])
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


# --------------------------------------------------------------------------------------------------------
# Saving


def _prune(root: Path, keep_last: int, just_written: Path, step: int) -> None:
    for child in root.iterdir():
        if _DEBRIS_RE.match(child.name) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last <= 0:
        return
    lineage = [(s, p) for s, p in _complete_checkpoints(root) if s <= step and p != just_written]
    doomed = lineage[:max(len(lineage) - (keep_last - 1), 0)]
    for _, path in doomed:
        log.info("pruning checkpoint %s (keep_last=%d)", path, keep_last)
        _remove_tree(path)


def _install_directory(tmp: Path, final: Path, pid: int) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f"{final.name}.old-{pid}")
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _save_failure(step: int, final: Path, failed: list[int], rank: int, error: BaseException | None) -> CheckpointError:
    if error is not None:
        err = CheckpointError(f"saving checkpoint step {step} to {final} failed on rank {rank}: "
                              f"{type(error).__name__}: {error}; `latest` is unchanged")
        err.__cause__ = error
        return err
    return CheckpointError(f"saving checkpoint step {step} to {final} failed on rank(s) {failed} (see their "
                           f"logs); `latest` is unchanged")


def _collective_phase(work, step: int, final: Path, tmp: Path, rank: int) -> None:
    """Run ``work`` on every rank; if it failed anywhere, every rank raises (rank 0 removes the temp folder)."""
    error: Exception | None = None
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = exc
    failed = _failed_ranks(error is not None)
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failure(step, final, failed, rank, error)


def save_checkpoint(run_dir: str | Path, step: int, *, student: nn.Module,
                    optimizer: torch.optim.Optimizer | None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    teacher: nn.Module | None, state: TrainState, config_yaml: str, keep_last: int = 2,
                    distributed: bool = False) -> Path:
    """Write ``run_dir/checkpoints/step_<step>/`` atomically, point ``latest`` at it, prune old ones.

    Collective: every rank calls it; each writes its own ``rank_<r>.pt``. ``distributed``: also write the
    layout-independent megatron-core copy (``dist/``) that a run with another layout resumes from.
    Returns the checkpoint directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if state.step != step:
        raise ValueError(f"step={step} but state.step={state.step}; they name the same training step")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    if not isinstance(config_yaml, str):
        raise TypeError(f"config_yaml must be the resolved config as a YAML string, got {type(config_yaml).__name__}")

    rank, world = _rank_world()
    layout = _current_layout()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    pid = _broadcast_from_rank0(os.getpid())
    tmp = root / f"{final.name}.tmp-{pid}"

    def write_rank_file() -> None:
        payload = {
            "format_version": FORMAT_VERSION,
            "rank": rank,
            "layout": layout,
            "step": step,
            "student": student.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _capture_rng(),
            "train_state": {"step": state.step, "data_position": state.data_position,
                            "metadata": state.metadata},
        }
        _check_loadable(payload, "checkpoint")
        tmp.mkdir(parents=True, exist_ok=True)
        with open(tmp / rank_file_name(rank), "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())

    def write_distributed_copy() -> None:
        from caopd_megatron.checkpointing.distributed_checkpoint import save_distributed

        save_distributed(tmp / DIST_DIR, student=student, teacher=teacher, optimizer=optimizer, scheduler=scheduler,
                         metadata={"train_state": {"step": state.step, "data_position": state.data_position,
                                                   "metadata": state.metadata}})

    # Phase 1: every rank writes and fsyncs its own file into the shared temp folder; optionally (1b) the
    # layout-independent megatron-core copy goes into the same folder.
    _collective_phase(write_rank_file, step, final, tmp, rank)
    if distributed:
        _collective_phase(write_distributed_copy, step, final, tmp, rank)

    error: Exception | None = None
    # Phase 2: rank 0 seals the folder, renames it into place, then (and only then) moves `latest`.
    if rank == 0:
        try:
            missing = [rank_file_name(r) for r in range(world) if not (tmp / rank_file_name(r)).is_file()]
            if missing:
                raise CheckpointError(f"rank files {missing} did not appear in {tmp}: run_dir must be on a "
                                      f"filesystem shared by all ranks")
            meta = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "layout": layout,
                "rank_files": [rank_file_name(r) for r in range(world)],
                "has_teacher": teacher is not None,
                "distributed": DIST_DIR if distributed else None,
                "saved_at_unix": time.time(),
                "config_yaml": config_yaml,
                "complete": True,  # last key, written after every rank file
            }
            _write_bytes_durably(tmp / META_FILE, json.dumps(meta, indent=2).encode("utf-8"))
            _fsync_dir(tmp)
            _install_directory(tmp, final, pid)
            _fsync_dir(root)
            _replace_text_atomically(root / LATEST_FILE, final.name + "\n")
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
            error = exc
            shutil.rmtree(tmp, ignore_errors=True)
    failed = _failed_ranks(error is not None)
    if failed:
        raise _save_failure(step, final, failed, rank, error)

    if rank == 0:
        try:
            _prune(root, keep_last, final, step)
        except OSError as exc:
            log.warning("pruning old checkpoints in %s failed (the new checkpoint is safe): %s", root, exc)
    log.info("saved checkpoint %s (rank %d of %d)", final, rank, world)
    return final


# --------------------------------------------------------------------------------------------------------
# Loading


def _resolve(path_or_run_dir: str | Path) -> Path:
    p = Path(path_or_run_dir)
    if (p / META_FILE).exists() or _STEP_RE.match(p.name):
        _read_meta(p)
        return p
    if (p / CHECKPOINTS_DIR).is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"no complete checkpoint under {p / CHECKPOINTS_DIR}")
        return found
    raise CheckpointError(f"{p} is neither a checkpoint directory (with {META_FILE}) nor a run directory "
                          f"(with {CHECKPOINTS_DIR}/)")


def _read_rank_file(ckpt: Path, rank: int) -> dict[str, Any]:
    f = ckpt / rank_file_name(rank)
    try:
        payload = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{f} is missing") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated pickle, refused global: all "corrupt"
        raise CheckpointError(f"{f} is corrupt or not a caopd checkpoint file: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    required = ("format_version", "rank", "layout", "step", "student", "teacher", "optimizer", "scheduler",
                "rng", "train_state")
    if not isinstance(payload, dict) or any(k not in payload for k in required):
        raise CheckpointError(f"{f} is not a caopd checkpoint file (missing keys)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {payload['format_version']!r}; this code reads "
                              f"version {FORMAT_VERSION}")
    if payload["rank"] != rank:
        raise CheckpointError(f"{f} was written by rank {payload['rank']}, not rank {rank}")
    return payload


def _check_state_dict(saved: Mapping[str, Any], module: nn.Module, what: str, source: Path) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{source}: {what} keys differ from the model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    for key, want in expected.items():
        got = saved[key]
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape != want.shape:
            raise CheckpointError(f"{source}: {what} tensor '{key}' has shape {tuple(got.shape)} in the "
                                  f"checkpoint but {tuple(want.shape)} in the model")


def _check_optimizer(saved: Mapping[str, Any], optimizer: Any, source: Path) -> None:
    if hasattr(optimizer, "check_state_dict"):  # an optimizer with its own state format (a sharded one)
        try:
            optimizer.check_state_dict(saved)
        except ValueError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
        return
    if "format" in saved:
        raise CheckpointError(f"{source}: optimizer state is in the {saved['format']!r} format (written with "
                              f"parallel.use_distributed_optimizer=true and DP > 1) but this run uses a torch "
                              f"optimizer: resume with the setting the checkpoint was written with")
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or "state" not in saved:
        raise CheckpointError(f"{source}: optimizer state has no param_groups/state")
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{source}: optimizer has {len(groups)} parameter groups in the checkpoint but "
                              f"{len(optimizer.param_groups)} in this run")
    id_to_param: dict[Any, torch.Tensor] = {}
    for i, (sg, g) in enumerate(zip(groups, optimizer.param_groups)):
        if len(sg["params"]) != len(g["params"]):
            raise CheckpointError(f"{source}: optimizer group {i} has {len(sg['params'])} parameters in the "
                                  f"checkpoint but {len(g['params'])} in this run")
        id_to_param.update(zip(sg["params"], g["params"]))
    for pid, pstate in saved["state"].items():
        param = id_to_param.get(pid)
        if param is None:
            raise CheckpointError(f"{source}: optimizer state for parameter id {pid!r} matches no parameter")
        for name in _ELEMENTWISE_OPT_STATE:
            value = pstate.get(name) if isinstance(pstate, dict) else None
            if isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise CheckpointError(f"{source}: optimizer state '{name}' of parameter #{pid} has shape "
                                      f"{tuple(value.shape)} in the checkpoint but the parameter has shape "
                                      f"{tuple(param.shape)}")


def _validate(ckpt: Path, rank: int, student: nn.Module, optimizer: torch.optim.Optimizer | None,
              scheduler: Any | None, teacher: nn.Module | None) -> dict[str, Any]:
    meta = _read_meta(ckpt)
    _check_layout(ckpt, meta["layout"], _current_layout())
    payload = _read_rank_file(ckpt, rank)
    source = ckpt / rank_file_name(rank)
    if payload["layout"] != meta["layout"] or payload["step"] != meta["step"]:
        raise CheckpointError(f"{source} does not belong to {ckpt / META_FILE} (step/layout differ)")
    _check_state_dict(payload["student"], student, "student", source)
    if teacher is not None and payload["teacher"] is not None:
        _check_state_dict(payload["teacher"], teacher, "teacher", source)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise CheckpointError(f"{source} holds no optimizer state but an optimizer was passed to load into")
        _check_optimizer(payload["optimizer"], optimizer, source)
    if scheduler is not None and payload["scheduler"] is None:
        raise CheckpointError(f"{source} holds no LR-scheduler state but a scheduler was passed to load into")
    return payload


def _apply(payload: dict[str, Any], source: Path, student: nn.Module, optimizer: torch.optim.Optimizer | None,
           scheduler: Any | None, teacher: nn.Module | None, restore_rng: bool) -> None:
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
    if restore_rng:
        try:
            _restore_rng(payload["rng"], source)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source}: RNG state is malformed: {exc!r}") from exc


def load_checkpoint(path_or_run_dir: str | Path, *, student: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None,
                    teacher: nn.Module | None = None, restore_rng: bool = True) -> TrainState:
    """Restore a checkpoint (a ``step_*`` directory, or a run directory's latest) into the given objects.

    Collective: every rank calls it and reads its own ``rank_<r>.pt``. Everything is validated on every rank
    before anything is modified. Returns the saved ``TrainState``.
    """
    rank, _ = _rank_world()
    # Rank 0 resolves the directory so a concurrent `latest` update cannot send ranks to different steps.
    resolved: tuple[str | None, str | None] = (None, None)
    if rank == 0:
        try:
            resolved = (str(_resolve(path_or_run_dir)), None)
        except CheckpointError as exc:
            resolved = (None, str(exc))
    ckpt_str, reason = _broadcast_object_from_rank0(resolved)
    if ckpt_str is None:
        raise CheckpointError(reason or f"cannot resolve a checkpoint from {path_or_run_dir}")
    ckpt = Path(ckpt_str)
    source = ckpt / rank_file_name(rank)
    meta = _read_meta(ckpt)
    if not _same_layout(meta["layout"], _current_layout()) and meta.get("distributed"):
        return _load_resharded(ckpt, meta, student, optimizer, scheduler, teacher)

    error: CheckpointError | None = None
    payload: dict[str, Any] = {}
    try:
        payload = _validate(ckpt, rank, student, optimizer, scheduler, teacher)
    except CheckpointError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - a well-formed zip with a malformed payload
        error = CheckpointError(f"{source} has a malformed payload: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
    failed = _failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"loading {ckpt} failed on rank(s) {failed} (see their logs); nothing was restored")

    try:
        _apply(payload, source, student, optimizer, scheduler, teacher, restore_rng)
    except CheckpointError as exc:
        error = exc
    failed = _failed_ranks(error is not None)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"loading {ckpt} failed on rank(s) {failed} while restoring state")

    ts = payload["train_state"]
    log.info("loaded checkpoint %s (rank %d, step %d)", ckpt, rank, ts["step"])
    return TrainState(step=int(ts["step"]), data_position=ts["data_position"], metadata=ts["metadata"])


def _load_resharded(ckpt: Path, meta: Mapping[str, Any], student: nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler: Any | None,
                    teacher: nn.Module | None) -> TrainState:
    """Resume from the checkpoint's distributed copy under this run's (different) layout. Collective."""
    from caopd_megatron.checkpointing.distributed_checkpoint import DistributedCheckpointError, load_distributed

    try:
        saved = load_distributed(ckpt / meta["distributed"], student=student, teacher=teacher, optimizer=optimizer,
                                 scheduler=scheduler)
    except DistributedCheckpointError as exc:
        raise CheckpointError(f"{ckpt}: resharding from layout ({_describe_layout(meta['layout'])}) to "
                              f"({_describe_layout(_current_layout())}) failed: {exc}") from exc
    ts = saved["train_state"]
    log.warning("resharded checkpoint %s from layout (%s) to (%s); RNG streams are per rank and were not restored",
                ckpt, _describe_layout(meta["layout"]), _describe_layout(_current_layout()))
    return TrainState(step=int(ts["step"]), data_position=ts["data_position"], metadata=ts["metadata"])
