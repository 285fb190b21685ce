"""Find out, once, which accelerations this process can use, and import megatron-core safely.

Design decisions:
- Transformer Engine and NVIDIA apex are optional: they are imported lazily, and a missing or broken one
  falls back to megatron-core's local (pure PyTorch) implementations. The log states the active path.
- A Transformer Engine that is installed but cannot load its CUDA libraries makes ``import megatron.core``
  itself raise RuntimeError. ``import_megatron_core`` turns that into a message that says what to do,
  instead of a traceback from inside TE.
- ``apex`` on PyPI is an unrelated web package: NVIDIA apex is recognised by ``apex.normalization``.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """The software stack cannot run this job; the message says how to fix it."""


@dataclass(frozen=True)
class Backend:
    device: str  # "cuda" or "cpu"
    megatron_version: str
    transformer_engine: bool  # TE imported and CUDA present
    apex: bool  # NVIDIA apex (not the PyPI web package)
    cpu_shims: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        te = "Transformer Engine" if self.transformer_engine else "local PyTorch layers (Transformer Engine not usable)"
        apex = "NVIDIA apex" if self.apex else "torch optimizers (no NVIDIA apex)"
        shims = f"; CPU shims: {', '.join(self.cpu_shims)}" if self.cpu_shims else ""
        return f"device={self.device}, megatron-core {self.megatron_version}, {te}, {apex}{shims}"


def import_megatron_core():
    """Import megatron.core, translating the broken-Transformer-Engine failure into an actionable error."""
    with warnings.catch_warnings():
        # megatron-core warns at import that TE/apex are absent; we report the active path ourselves.
        warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
        warnings.filterwarnings("ignore", message=".*Apex.*")
        try:
            import megatron.core as mcore
            import megatron.core.optimizer  # noqa: F401  (emits the same warnings; import it quietly too)
        except RuntimeError as exc:
            raise BackendError(
                "importing megatron.core failed because an installed Transformer Engine cannot load its CUDA "
                f"libraries ({exc}). On a machine without a working CUDA stack, uninstall it "
                "(`pip uninstall -y transformer_engine transformer_engine_torch transformer_engine_cu12`) "
                "or fix LD_LIBRARY_PATH so it finds libcudart/libcublas; caopd_megatron runs without it."
            ) from None
        except ImportError as exc:
            raise BackendError(f"megatron-core is not installed or broken ({exc}); `pip install -e .` installs it") from None
    return mcore


def _te_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
        return True
    except Exception as exc:  # ImportError, or OSError/RuntimeError from its CUDA libraries
        log.info("Transformer Engine not usable: %s", exc)
        return False


def _nvidia_apex_present() -> bool:
    try:
        importlib.import_module("apex.normalization")
        return True
    except Exception:
        return False


@lru_cache(maxsize=1)
def fused_softmax_kernels_present() -> bool:
    """megatron's fused masked-softmax CUDA extensions (built in NVIDIA's containers, absent from pip's
    megatron-core). ``FusedScaleMaskSoftmax`` imports them unguarded when ``masked_softmax_fusion`` is on and a
    half-precision batch has kernel-friendly shapes, so the fusion may only be asked for when they import."""
    try:
        importlib.import_module("scaled_masked_softmax_cuda")
        importlib.import_module("scaled_upper_triang_masked_softmax_cuda")
        return True
    except Exception:
        return False


@lru_cache(maxsize=1)
def detect_backend() -> Backend:
    """Import megatron-core, install the CPU shims if CUDA is absent, and describe the active path."""
    mcore = import_megatron_core()
    from caopd_megatron.runtime import cpu_compat

    try:
        shims = cpu_compat.activate()
    except cpu_compat.CpuShimError as exc:
        raise BackendError(str(exc)) from exc
    version = getattr(getattr(mcore, "package_info", None), "__version__", "unknown")
    return Backend(
        device="cuda" if torch.cuda.is_available() else "cpu",
        megatron_version=version,
        transformer_engine=_te_usable(),
        apex=_nvidia_apex_present(),
        cpu_shims=tuple(shims),
    )
