"""RNG streams of one rank: captured into plain tensors/values at save, restored last at load.

Design decisions:
- Everything is stored in a form ``torch.load(weights_only=True)`` rebuilds: python ``random``'s state as a
  JSON-able dict, numpy's legacy global state (only when numpy is imported) as a tensor plus scalars, torch
  CPU/CUDA states as byte tensors, megatron-core's model-parallel RNG tracker (only when megatron-core is
  imported and the tracker exists) as named tensors.
- Megatron-core is never imported here; its tracker is consulted only if the process already created it
  (asking for it earlier would create a default one and pin its type).
- An uninitialised CUDA context is not queried (that would initialise CUDA on every visible device); the
  caller's seeding recreates its lazily queued seed.
- Streams are per rank: a resume under another layout does not restore them (``checkpoint.py``).
"""
from __future__ import annotations

import importlib
import logging
import random
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)


def _megatron_rng_tracker() -> Any | None:
    rnd = sys.modules.get("megatron.core.tensor_parallel.random")
    # Asking for the tracker before megatron created one would create a default one and pin its type.
    if rnd is None or not getattr(rnd, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False):
        return None
    return rnd.get_cuda_rng_tracker()


def capture_rng() -> dict[str, Any]:
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


def restore_rng(rng: Mapping[str, Any], source: Path) -> None:
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
