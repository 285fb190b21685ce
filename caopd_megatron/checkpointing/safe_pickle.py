"""Reading the pickled parts of a megatron-core distributed checkpoint without running code from the file.

Design decisions:
- A ``torch_dist`` checkpoint has two pickled files: ``common.pt`` (read by megatron-core with
  ``torch.load``) and ``.metadata`` (PyTorch DCP's ``Metadata``, read with plain ``pickle``). Before either
  library reads them, ``verify_distributed_checkpoint`` re-reads both with restricted loaders and refuses the
  checkpoint if anything else is referenced, so the later full load can only rebuild the same harmless objects.
- ``common.pt``: ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings).
- ``.metadata``: ``DcpMetadataUnpickler`` admits exactly (a) data classes and enums defined in DCP's
  ``metadata``, ``filesystem`` and ``planner`` modules (constructing them runs no code of the file's choosing),
  (b) ``torch.Size`` and the ``torch`` dtype / layout / memory-format singletons, plus
  ``torch.serialization._get_layout`` (a lookup by name), (c) ``pathlib`` paths (``StorageMeta``'s checkpoint
  id) and (d) ``OrderedDict``, ``set``, ``frozenset``. Any other global is an ``UnsafeCheckpointError``.
- Every failure is ``UnsafeCheckpointError`` (a ``ValueError``) naming the file; callers wrap it in their own
  error type. No megatron import: this module is shared by the HF tools and the training checkpoints.
"""
from __future__ import annotations

import dataclasses
import enum
import pickle
from pathlib import Path
from typing import Any

import torch

DCP_METADATA_FILE = ".metadata"
COMMON_STATE_FILE = "common.pt"
MCORE_METADATA_FILE = "metadata.json"

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
# Besides DCP's own dataclasses/enums: what their fields pickle as (sizes, a layout looked up by name,
# the checkpoint path of ``StorageMeta``) and plain containers.
_ALLOWED_GLOBALS = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
})
_TORCH_SINGLETONS = (torch.dtype, torch.layout, torch.memory_format)


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint file is missing, corrupt, or references something outside the allow-list."""


class _RefusedGlobal(pickle.UnpicklingError):
    """Raised by ``find_class`` for a global outside the allow-list (told apart from a corrupt file)."""


class DcpMetadataUnpickler(pickle.Unpickler):
    """Admits only DCP metadata data classes/enums, torch sizes/dtypes/layouts/memory formats, paths, containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_SINGLETONS):
            return getattr(torch, name)
        raise _RefusedGlobal(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def read_dcp_metadata(ckpt_dir: str | Path) -> Any:
    """The PyTorch DCP ``Metadata`` of ``ckpt_dir/.metadata``, unpickled with the allow-list."""
    path = Path(ckpt_dir) / DCP_METADATA_FILE
    if not path.is_file():
        raise UnsafeCheckpointError(f"{ckpt_dir}: not a megatron-core distributed checkpoint (no {DCP_METADATA_FILE} file)")
    try:
        with open(path, "rb") as f:
            return DcpMetadataUnpickler(f).load()
    except _RefusedGlobal as exc:
        raise UnsafeCheckpointError(f"{path}: refused ({exc})") from None
    except Exception as exc:  # truncated or garbled file
        raise UnsafeCheckpointError(f"{path}: corrupt checkpoint metadata ({exc})") from None


def check_weights_only(path: str | Path) -> None:
    """Refuse ``path`` unless ``torch.load(weights_only=True)`` reads it (no pickled code)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnsafeCheckpointError(f"{path}: refused, not loadable with weights_only=True ({exc})") from None


def verify_distributed_checkpoint(ckpt_dir: str | Path) -> Any:
    """Verify the pickled parts of a ``torch_dist`` checkpoint hold no code; return its DCP ``Metadata``."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / MCORE_METADATA_FILE).is_file():
        raise UnsafeCheckpointError(f"{ckpt}: not a megatron-core distributed checkpoint (no {MCORE_METADATA_FILE})")
    common = ckpt / COMMON_STATE_FILE
    if common.is_file():
        check_weights_only(common)
    return read_dcp_metadata(ckpt)
