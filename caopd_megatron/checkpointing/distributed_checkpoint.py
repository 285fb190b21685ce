"""Layout-independent checkpoints with megatron-core distributed checkpointing (``dist_checkpointing``).

Design decisions:
- Format: megatron-core's ``torch_dist`` backend (torch.distributed.checkpoint files + ``metadata.json``),
  written collectively by every rank from ``model.sharded_state_dict()``. Each tensor is stored once by its
  *global* key, shape and offsets, so a checkpoint written under one TP/PP/DP layout loads under any other:
  each rank reads exactly the slices its new shards need. It works on CPU with gloo.
- Contents, each under its own key prefix: ``student.*`` and ``teacher.*`` weights (the teacher may be
  another size), the student's torch-optimizer state (``optimizer.*``: Adam moments are elementwise
  companions of their parameter, so megatron's ``optim_state_to_sharding_state`` gives them the parameter's
  sharding, SwiGLU and tied-embedding special cases included) or, for megatron's distributed optimizer
  (``parallel/distributed_optimizer.py``), its own ``fully_reshardable`` sharded state (the DP ranges
  gathered into parameter-shaped ``param``/``exp_avg``/``exp_avg_sq``, re-cut like ours on load, vocabulary
  padding included); the two optimizer kinds are not interchangeable and a mismatch is refused with a
  message (``common.distributed_optimizer`` records which), and a small "common" part saved by rank 0
  (LR-scheduler state, caller metadata such as the step and data position). RNG streams are not included:
  they are per rank and mean nothing in another layout (a resumed run re-seeds).
- Vocabulary padding depends on TP (megatron pads to a multiple of ``make_vocab_size_divisible_by x TP``),
  so the embedding / output layer of the saved and the loading layout can have different global row counts.
  Those tensors are then read whole (rows hold only real tokens plus zero padding) and trimmed or
  zero-padded to the loading model's rows before its shard is cut: padding rows carry no token, so nothing
  real is lost or invented.
- Loading validates before it mutates: shapes and keys are checked by ``dist_checkpointing.load`` (strict
  by default in ``load_state_dict``); parameters are only copied after every tensor was read.
- The per-rank format (``checkpoint.py``) stays the fast path for same-layout resumes; this module is what
  ``checkpoint.py`` routes to when the layout differs, and what exports / imports use.
- Cost note: megatron's ``torch_dist`` writer starts a helper process the first time a process saves
  (seconds on a small CPU machine); later saves reuse it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from caopd_megatron.distill.optim import init_adam_state
from caopd_megatron.parallel.data_parallel import unwrap
from caopd_megatron.parallel.state import VOCAB_PARAMS, fit_rows

log = logging.getLogger(__name__)

STUDENT, TEACHER, OPTIMIZER = "student.", "teacher.", "optimizer"
COMMON = "common"


class DistributedCheckpointError(RuntimeError):
    """A distributed checkpoint cannot be written or read; the message says which and why."""


def _model_sharded(model, prefix: str) -> dict:
    return unwrap(model).sharded_state_dict(prefix=prefix)


def _is_sharded_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "load_sharded_state_dict")  # megatron's distributed optimizer (wrapped)


def _optimizer_sharded(optimizer, model_sharded: dict, is_loading: bool = False) -> dict:
    """Optimizer state with each per-parameter tensor sharded like its parameter (torch AdamW, or megatron's
    distributed optimizer in its ``fully_reshardable`` form, whose ranges are gathered over DP)."""
    if _is_sharded_optimizer(optimizer):
        return optimizer.sharded_state_dict(model_sharded, is_loading=is_loading)
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    steps = {float(s["step"]) for s in state["state"].values() if "step" in s}
    if len(steps) > 1:
        raise DistributedCheckpointError(f"optimizer parameters are at different steps {sorted(steps)}")
    id_map = get_param_id_to_sharded_param_map(model_sharded, params)
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    # One shared step (AdamW's per-parameter step is the same for all: one optimizer.step() per train step).
    state["common_step"] = steps.pop() if steps else None
    return state


def save_distributed(directory: str | Path, *, student, teacher=None, optimizer=None, scheduler=None,
                     metadata: dict | None = None) -> Path:
    """Write a layout-independent checkpoint into ``directory`` (created; must be empty or absent).

    Collective: every rank of the job calls it (each writes the shards it is the main replica of).
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if torch.distributed.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state: dict[str, Any] = {"student": _model_sharded(student, STUDENT)}
    if teacher is not None:
        state["teacher"] = _model_sharded(teacher, TEACHER)
    if optimizer is not None and (_is_sharded_optimizer(optimizer) or optimizer.state):
        state[OPTIMIZER] = _optimizer_sharded(optimizer, state["student"])
    state[COMMON] = {"scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "metadata": metadata or {}, "has_teacher": teacher is not None,
                     "has_optimizer": OPTIMIZER in state,
                     "distributed_optimizer": optimizer is not None and _is_sharded_optimizer(optimizer)}
    dist_checkpointing.save(state, str(directory))
    log.info("saved distributed checkpoint %s", directory)
    return directory


def _replace_vocab_entries(sharded: dict, saved_meta: dict) -> dict[str, tuple[Any, int, int]]:
    """Swap vocab-parallel entries whose saved row count differs for whole-tensor reads; return how to re-cut.

    Returns ``{dict key: (the original ShardedTensor, rows of this model's full tensor, this TP rank)}``.
    """
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    recut = {}
    for key, sh in list(sharded.items()):
        if not isinstance(sh, ShardedTensor) or not any(sh.key.endswith(v) for v in VOCAB_PARAMS):
            continue
        meta = saved_meta.get(sh.key)
        if meta is None or tuple(meta.global_shape) == tuple(sh.global_shape):
            continue
        if tuple(meta.global_shape[1:]) != tuple(sh.global_shape[1:]):
            raise DistributedCheckpointError(f"{sh.key}: checkpoint shape {tuple(meta.global_shape)} and model shape "
                                             f"{tuple(sh.global_shape)} differ beyond vocabulary padding")
        whole = torch.empty(tuple(meta.global_shape), dtype=sh.data.dtype)
        # Every rank reads the whole tensor; only global rank 0 is its "main replica" for the access check.
        sharded[key] = ShardedTensor.from_rank_offsets(sh.key, whole, replica_id=torch.distributed.get_rank())
        recut[key] = (sh, int(sh.global_shape[0]), parallel_state.get_tensor_model_parallel_rank())
    return recut


def _recut(loaded: dict, recut: dict) -> None:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    for key, (sh, rows, tp_rank) in recut.items():
        full = fit_rows(loaded[key], rows)
        loaded[key] = full.chunk(tp, dim=0)[tp_rank] if sh.data.size(0) * tp == rows else full


def _strip(prefix: str, loaded: dict) -> dict:
    return {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}


def _per_param_key(optimizer) -> str:
    """Where the per-parameter tensors sit in the optimizer's sharded state dict."""
    return "param_state" if _is_sharded_optimizer(optimizer) else "state"


def _load_optimizer(optimizer: torch.optim.Optimizer, loaded: dict) -> None:
    """Rebuild a torch optimizer state dict from the loaded sharded one (this layout's parameter ids)."""
    step = loaded.get("common_step")
    state = {}
    for pid, tensors in loaded["state"].items():
        state[pid] = dict(tensors)
        if step is not None:
            state[pid]["step"] = torch.tensor(float(step), dtype=torch.float32)
    optimizer.load_state_dict({"state": state, "param_groups": loaded["param_groups"]})


def load_distributed(directory: str | Path, *, student, teacher=None, optimizer=None, scheduler=None) -> dict:
    """Read a checkpoint of ``save_distributed`` (any layout) into this layout's objects; return its metadata.

    Collective. ``teacher``/``optimizer``/``scheduler`` are restored when given and present in the
    checkpoint (a missing optimizer state is an error when an optimizer is passed). Everything is read
    before anything is modified.
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise DistributedCheckpointError(f"{directory} is not a megatron-core distributed checkpoint "
                                         f"(no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(directory))[COMMON]
    saved_meta = dist_checkpointing.load_tensors_metadata(str(directory))
    state: dict[str, Any] = {"student": _model_sharded(student, STUDENT)}
    recut: dict[str, dict] = {"student": _replace_vocab_entries(state["student"], saved_meta)}
    if teacher is not None and common["has_teacher"]:
        state["teacher"] = _model_sharded(teacher, TEACHER)
        recut["teacher"] = _replace_vocab_entries(state["teacher"], saved_meta)
    opt_recut: dict = {}
    if optimizer is not None:
        if not common["has_optimizer"]:
            raise DistributedCheckpointError(f"{directory} holds no optimizer state but an optimizer was passed")
        sharded_optimizer = _is_sharded_optimizer(optimizer)
        if common.get("distributed_optimizer", False) != sharded_optimizer:
            raise DistributedCheckpointError(
                f"{directory} holds {'distributed' if not sharded_optimizer else 'torch'}-optimizer state but this "
                f"run uses {'the distributed' if sharded_optimizer else 'a torch'} optimizer "
                f"(parallel.use_distributed_optimizer with DP > 1): resume with the same setting")
        if sharded_optimizer:
            state[OPTIMIZER] = _optimizer_sharded(optimizer, _model_sharded(student, STUDENT), is_loading=True)
        else:
            backup = {p: dict(st) for p, st in optimizer.state.items()}
            init_adam_state(optimizer)  # tensors to read into; the real state is restored below
            state[OPTIMIZER] = _optimizer_sharded(optimizer, _model_sharded(student, STUDENT))
            optimizer.state.clear()
            optimizer.state.update(backup)
        for pid, entries in state[OPTIMIZER][_per_param_key(optimizer)].items():
            opt_recut[pid] = _replace_vocab_entries(entries, saved_meta)
    try:
        loaded = dist_checkpointing.load(state, str(directory))
    except Exception as exc:  # noqa: BLE001 - megatron raises assorted errors for mismatched checkpoints
        raise DistributedCheckpointError(f"reading {directory} failed: {type(exc).__name__}: {exc}") from exc
    for part in ("student", "teacher"):
        if part in loaded:
            _recut(loaded[part], recut[part])
    for pid, entries in opt_recut.items():
        _recut(loaded[OPTIMIZER][_per_param_key(optimizer)][pid], entries)
    unwrap(student).load_state_dict(_strip(STUDENT, loaded["student"]), strict=True)
    if "teacher" in loaded:
        unwrap(teacher).load_state_dict(_strip(TEACHER, loaded["teacher"]), strict=True)
    if optimizer is not None and _is_sharded_optimizer(optimizer):
        optimizer.load_sharded_state_dict(loaded[OPTIMIZER])
    elif optimizer is not None:
        _load_optimizer(optimizer, loaded[OPTIMIZER])
    if scheduler is not None and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    log.info("loaded distributed checkpoint %s", directory)
    return common["metadata"]
