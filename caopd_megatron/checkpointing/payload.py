"""What one rank file holds, and the checks that keep it loadable, finite and matching the run.

Design decisions:
- A rank file is one ``torch.save`` of plain values and tensors (state dicts, optimizer and scheduler state,
  RNG streams, train state), read only with ``torch.load(weights_only=True)`` after its hash was verified.
- At save: every value must be one ``weights_only`` rebuilds (a numpy scalar fails the save, named, not a
  resume weeks later) and every floating tensor finite (a diverged model is never checkpointed or pruned over).
- At load, before anything is modified: state-dict keys and shapes, optimizer groups and per-parameter shapes.
- A torch optimizer's ``state_dict()`` is stored as is; megatron's distributed optimizer's wrapper adds its
  per-rank ranges and validates through ``check_state_dict``; one kind refuses the other's state.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from caopd_megatron.checkpointing.format import CheckpointError

PAYLOAD_VERSION = 1
REQUIRED_KEYS = ("format_version", "rank", "layout", "step", "student", "teacher", "optimizer", "scheduler",
                 "rng", "train_state")
# Optimizer state entries that are elementwise companions of their parameter (same shape). Other entries
# (scalars, factored second moments) are not shape-checked.
_ELEMENTWISE_OPT_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg",
                          "acc_delta", "sum", "ax", "prev", "main_param")
_ATOMS: tuple[type, ...] = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                            torch.Size)


def _walk(obj: Any, where: str):
    """Yield (path, leaf) of a nested dict/list/tuple/set value; raise on a type weights_only cannot rebuild."""
    kind = type(obj)
    # Exact type checks: subclasses such as numpy.float64 (a float) or IntEnum members pickle as their own
    # class, which the weights_only unpickler refuses.
    if kind in (torch.Tensor, nn.Parameter) or kind in _ATOMS:
        yield where, obj
    elif kind in (list, tuple, set):
        for i, item in enumerate(obj):
            yield from _walk(item, f"{where}[{i}]")
    elif kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            yield from _walk(key, f"{where} key {key!r}")
            yield from _walk(value, f"{where}[{key!r}]")
    else:
        raise CheckpointError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) cannot "
            f"rebuild; store plain Python values (dict/list/tuple/str/int/float/bool/None) or tensors")


def check_savable(payload: Any, step: int) -> None:
    """Every value loadable with ``weights_only``; every floating tensor of the model/optimizer state finite."""
    for where, leaf in _walk(payload, "checkpoint"):
        if (isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.numel()
                and not bool(torch.isfinite(leaf).all())):
            raise CheckpointError(f"refusing to checkpoint step {step}: {where} holds non-finite values (the run "
                                  f"diverged); the previous checkpoints are kept")


def read_rank_file(path: Path, rank: int) -> dict[str, Any]:
    """The payload of ``path`` (already hash-verified), unpickled with ``weights_only=True``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt zip, truncated pickle, refused global: all "corrupt"
        raise CheckpointError(f"{path} is corrupt or not a caopd checkpoint file: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a caopd checkpoint file (missing keys)")
    if payload["format_version"] != PAYLOAD_VERSION:
        raise CheckpointError(f"{path} has format_version {payload['format_version']!r}; this code reads "
                              f"version {PAYLOAD_VERSION}")
    if payload["rank"] != rank:
        raise CheckpointError(f"{path} was written by rank {payload['rank']}, not rank {rank}")
    return payload


def check_state_dict(saved: Mapping[str, Any], module: nn.Module, what: str, source: Path) -> None:
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


def check_optimizer(saved: Mapping[str, Any], optimizer: Any, source: Path) -> None:
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
