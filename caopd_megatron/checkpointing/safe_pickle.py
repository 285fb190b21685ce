"""Reading the pickled parts of a megatron-core distributed checkpoint without running code from the file.

Design decisions:
- PyTorch DCP stores its ``.metadata`` with plain ``pickle`` and megatron-core's ``common.pt`` with
  ``torch.save``; both loaders would rebuild whatever classes a tampered file names. Before megatron or DCP
  open a checkpoint, ``check_distributed_checkpoint`` re-reads both with restricted loaders: ``.metadata``
  through an unpickler that only admits DCP's metadata dataclasses and enums, torch sizes, dtypes, layouts
  and memory formats, paths and plain containers; ``common.pt`` with ``torch.load(weights_only=True)``.
  Anything else refuses the checkpoint, so the later full load can only rebuild those same harmless objects.
- Every load path of the project (HF export, initial weights, resharded resume) calls it first.
- Errors are ``UnsafeFileError`` naming the file; callers wrap it into their own error type.
"""
from __future__ import annotations

import dataclasses
import enum
import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A pickled checkpoint file references something the restricted loaders refuse, or is corrupt."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
# Besides DCP's own dataclasses/enums: what their fields pickle as (sizes, a layout looked up by name,
# the checkpoint path of ``StorageMeta``) and plain containers.
_ALLOWED_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Admits only DCP metadata dataclasses and torch sizes/dtypes/layouts/memory formats."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            # Data classes and enums only: constructing them runs no code of the file's choosing.
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def read_dcp_metadata(ckpt_dir: str | Path) -> Any:
    """The PyTorch DCP ``Metadata`` of a checkpoint, unpickled with an allow-list (never runs foreign code)."""
    path = Path(ckpt_dir) / ".metadata"
    if not path.is_file():
        raise UnsafeFileError(f"{ckpt_dir}: not a megatron-core distributed checkpoint (no .metadata file)")
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"{path}: refused ({exc})") from None
    except Exception as exc:  # truncated or garbled file
        raise UnsafeFileError(f"{path}: corrupt checkpoint metadata ({exc})") from None


def check_distributed_checkpoint(ckpt_dir: str | Path) -> Any:
    """Verify the pickled parts of a distributed checkpoint hold no code; return its DCP metadata."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / "metadata.json").is_file():
        raise UnsafeFileError(f"{ckpt}: not a megatron-core distributed checkpoint (no metadata.json)")
    common = ckpt / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UnsafeFileError(f"{common}: refused, not loadable with weights_only=True ({exc})") from None
    return read_dcp_metadata(ckpt)
