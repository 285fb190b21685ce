"""Let megatron-core run on a machine without CUDA (laptops, CI), and do nothing where CUDA exists.

Design decisions:
- megatron-core assumes CUDA in a handful of places. Rather than forking it, this module patches exactly
  those places, once, and only when ``torch.cuda.is_available()`` is False. On a GPU node it is a no-op, so
  the same project code runs unmodified on H100s.
- The places (verified on megatron-core 0.16.1):
  1. ``torch.cuda.current_device()`` is used as ``device=`` for ~40 allocations: it returns ``"cpu"``.
  2. ``CudaRNGStatesTracker`` forks/restores CUDA RNG states: the CUDA RNG calls map to the CPU generator,
     so tracker semantics (named, forkable streams) are kept and seeds stay reproducible.
  3. ``transformer/utils.get_default_causal_mask`` and the pipeline schedules, the param/grad buffers and the
     grad scaler allocate with a literal ``device="cuda"``: those modules see a ``torch`` whose factory
     functions rewrite a CUDA device to the CPU.
  4. ``torch.cuda.synchronize`` / ``torch.cuda.Event`` / streams are called by the schedules and the
     inference controller: they become no-ops / CPU stand-ins (CPU execution is already synchronous).
  5. ``Tensor.cuda()``: ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied embedding to CUDA
     before all-reducing it between the first and last pipeline stages (PP > 1 with tied embeddings). Without
     CUDA the call can only raise, so it returns the tensor itself (the gloo all-reduce takes CPU tensors).
  6. The distributed optimizer (``parallel.use_distributed_optimizer``): ``optimizer.optimizer``,
     ``optimizer.clip_grads``, ``optimizer.distrib_optimizer`` and ``utils.local_multi_tensor_l2_norm``
     (the norm without apex) allocate flags and norms with a literal ``device="cuda"`` (handled as in 3), and they sort parameters by their type *name*:
     ``DistributedOptimizer.__init__`` accepts only ``torch.cuda.{Float,Half,BFloat16}Tensor`` and
     ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``. Exactly those two
     callables run with ``Tensor.type()`` (no argument, nothing else changes) naming a CPU tensor's CUDA
     counterpart, so a CPU fp32 tensor takes the fp32 branch; outside those calls ``Tensor.type`` is torch's.
     gloo needs no shim: torch 2.13's gloo has ``reduce_scatter_tensor``, ``all_gather_into_tensor`` and
     the coalescing manager that the DDP buffers use for the reduce-scatter / all-gather.
- Everything is reversible in principle but in practice applied once per process before models are built;
  ``activate()`` is idempotent and returns which shims are active so the log can say so.
- Version-aware: the shims were written for megatron-core ``WRITTEN_FOR`` and are checked against 0.19 in CI.
  A shim whose target is gone (module, function, or a module that no longer mentions ``"cuda"``) has nothing
  to patch: it says so at DEBUG and stays inactive. A shim that raises stops start-up with ``CpuShimError``
  naming the shim, the megatron-core version it was written for and the installed one.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_ACTIVE: list[str] | None = None

# The megatron-core release the shims were written against (each place above was read in its source).
WRITTEN_FOR = "0.16.1"


class CpuShimError(RuntimeError):
    """A CPU shim failed on the installed megatron-core (the message names the shim and both versions)."""

# Factory functions that take a ``device=`` keyword and that megatron-core calls with ``device="cuda"``.
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "zeros_like",
              "ones_like", "empty_like")

# Modules that allocate with a literal "cuda" device string.
_LITERAL_CUDA_MODULES = (
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.tensor_parallel.data",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm, the norm of the optimizer's clipping without apex
)


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if str(device).startswith("cuda"):
        return "cpu"
    return device


class _CpuTorch(types.ModuleType):
    """A view of the ``torch`` module whose factory functions place "cuda" allocations on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args: Any, __f=attr, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                return __f(*args, **kwargs)
            return factory
        if name == "autocast":
            return lambda device_type="cpu", *a, **k: torch.autocast("cpu", *a, **k)
        return attr


_CPU_TORCH = _CpuTorch()


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` on the CPU: timing through ``time.perf_counter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, *args: Any, **kwargs: Any) -> None:
        import time
        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end._t - self._t) * 1000.0


class _CpuStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_CpuStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)  # type: ignore[assignment]
    # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all, which must
    # stay the lazy no-op it is on a CPU build (re-routing it here would recurse).
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    cuda.Event = _CpuEvent  # type: ignore[assignment,misc]
    cuda.Stream = _CpuStream  # type: ignore[assignment,misc]
    cuda.current_stream = lambda *a, **k: _CpuStream()  # type: ignore[assignment]
    cuda.stream = lambda *a, **k: _CpuStream()  # type: ignore[assignment]
    cuda.empty_cache = lambda: None  # type: ignore[assignment]
    cuda.device_count = lambda: 0  # type: ignore[assignment]
    cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment,method-assign]


def import_if_present(name: str) -> types.ModuleType | None:
    """The module ``name``, or None if this megatron-core has no such module (a module that exists but fails
    to import is an error for the caller, not an absence)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return None
        raise


def _patch_megatron_rng() -> bool:
    rnd = import_if_present("megatron.core.tensor_parallel.random")
    if rnd is None or not hasattr(rnd, "_get_cuda_rng_state"):
        return False
    rnd._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    rnd._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    return True


def _patch_literal_cuda_module(name: str) -> bool:
    """Give module ``name`` a ``torch`` whose factories put "cuda" allocations on the CPU."""
    mod = import_if_present(name)
    if mod is None or "cuda" not in inspect.getsource(mod):
        return False
    mod.torch = _CPU_TORCH  # type: ignore[attr-defined]
    if name == "megatron.core.transformer.utils":
        # get_default_causal_mask is lru-cached and imported by name: clear the cache of masks built before.
        for fn_name in ("get_default_causal_mask", "get_sliding_window_causal_mask"):
            fn = getattr(mod, fn_name, None)
            if fn is not None and hasattr(fn, "cache_clear"):
                fn.cache_clear()
    return True


def _cuda_type_names(fn):
    """``fn`` run with ``Tensor.type()`` (no argument) answering ``torch.cuda.X`` for a CPU ``torch.X``."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        original = torch.Tensor.type

        def named_as_cuda(self, dtype=None, non_blocking=False, **kw):
            if dtype is not None or kw:
                return original(self, dtype, non_blocking, **kw)
            name = original(self)
            return "torch.cuda." + name[len("torch."):] if not name.startswith("torch.cuda.") else name

        torch.Tensor.type = named_as_cuda  # type: ignore[method-assign]
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original  # type: ignore[method-assign]
    return wrapper


def _patch_type_name_checks() -> bool:
    clip_grads = import_if_present("megatron.core.optimizer.clip_grads")
    optimizer = import_if_present("megatron.core.optimizer.optimizer")
    distrib = import_if_present("megatron.core.optimizer.distrib_optimizer")
    patched = False
    if clip_grads is not None and hasattr(clip_grads, "clip_grad_by_total_norm_fp32"):
        clip = _cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
        clip_grads.clip_grad_by_total_norm_fp32 = clip
        if optimizer is not None and hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
            optimizer.clip_grad_by_total_norm_fp32 = clip  # imported by name there
        patched = True
    if distrib is not None and hasattr(distrib, "DistributedOptimizer"):
        distrib.DistributedOptimizer.__init__ = _cuda_type_names(distrib.DistributedOptimizer.__init__)
        patched = True
    return patched


@dataclass(frozen=True)
class Shim:
    """One patch: ``apply()`` returns whether it found something to patch in this megatron-core."""

    name: str
    apply: Callable[[], bool]


def _torch_cuda_shim() -> bool:
    _patch_torch_cuda()
    return True


SHIMS: tuple[Shim, ...] = (
    Shim("torch.cuda->cpu, Tensor.cuda->self", _torch_cuda_shim),
    Shim("rng-tracker->cpu-generator", _patch_megatron_rng),
    Shim("distrib-optimizer:type-names", _patch_type_name_checks),
    *(Shim(f"{name[len('megatron.core.'):]}:cuda->cpu", functools.partial(_patch_literal_cuda_module, name))
      for name in _LITERAL_CUDA_MODULES),
)


def megatron_version() -> str:
    try:
        return importlib.import_module("megatron.core").__version__
    except (ImportError, AttributeError):
        return "unknown"


def apply_shims(shims: tuple[Shim, ...]) -> list[str]:
    """Apply ``shims`` in order; returns the names of those that patched something."""
    version, active = megatron_version(), []
    for shim in shims:
        try:
            applied = shim.apply()
        except Exception as exc:
            raise CpuShimError(f"CPU shim '{shim.name}' (written for megatron-core {WRITTEN_FOR}) failed on "
                               f"megatron-core {version}: {type(exc).__name__}: {exc}") from exc
        if applied:
            active.append(shim.name)
        else:
            log.debug("CPU shim '%s' (written for megatron-core %s): nothing to patch in megatron-core %s",
                      shim.name, WRITTEN_FOR, version)
    return active


def activate() -> list[str]:
    """Install the CPU shims when CUDA is absent; return the names of the active shims (empty on GPU)."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if torch.cuda.is_available():
        _ACTIVE = []
        return _ACTIVE
    _ACTIVE = apply_shims(SHIMS)
    log.info("CUDA absent: megatron-core %s CPU shims active (%s)", megatron_version(), ", ".join(_ACTIVE))
    return _ACTIVE


def is_active() -> bool:
    return bool(_ACTIVE)
