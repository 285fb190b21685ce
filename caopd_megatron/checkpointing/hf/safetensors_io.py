"""Streaming access to Hugging Face weight files: read one tensor at a time, write shards tensor by tensor.

Design decisions:
- Reading: a folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``; the
  reader opens each file lazily with ``safetensors.safe_open`` (memory-mapped), so asking for one tensor
  reads only that tensor. Legacy ``pytorch_model.bin`` (single or indexed) is accepted only through
  ``torch.load(weights_only=True, mmap=True)``: no pickled code runs and storages stay on disk until used.
- Every failure names the file: a missing shard, an index that lists a tensor its shard lacks, a header
  that does not parse, a truncated file. These are ``CheckpointFileError`` (a ``ConversionError``).
- Writing: ``StreamingSafetensorsWriter`` is given the full plan (name, shape, dtype of every tensor, in
  the order they will be produced) up front. It splits the plan into shards of at most ``max_shard_bytes``,
  and because the header of a safetensors file only needs names, shapes and dtypes, it writes each shard's
  header first and then streams tensor bytes straight to disk. At most the tensor being written is in
  memory, never a whole shard (``safetensors.torch.save_file`` would need the shard materialised).
- Shard naming follows ``save_pretrained``: one shard is ``model.safetensors`` without an index; several
  are ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Files are written under a
  ``.partial`` suffix and renamed when complete, so an interrupted export never leaves a file that looks
  valid. The header carries ``{"format": "pt"}``, which ``transformers`` requires.
- The header is padded with spaces to a multiple of 8 bytes (as the reference writer does) so tensor data
  stays aligned for zero-copy memory mapping.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# safetensors dtype codes <-> torch dtypes (the subset a language model checkpoint uses).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
# Largest header the reference reader accepts (100 MB); a plan that needs more is split into more shards.
_MAX_HEADER_BYTES = 100_000_000


class ConversionError(ValueError):
    """Base class of every error the HF <-> Megatron converters raise; the message says what to fix."""


class CheckpointFileError(ConversionError):
    """A weight or config file is missing, unreadable or corrupt; the message names the file."""


def dtype_from_safetensors(code: str) -> torch.dtype:
    try:
        return _ST_DTYPES[code]
    except KeyError:
        raise ConversionError(f"unsupported safetensors dtype {code!r} (supported: {', '.join(_ST_DTYPES)})") from None


def safetensors_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ConversionError(f"cannot write dtype {dtype} to safetensors (supported: {list(_TORCH_TO_ST.values())})") from None


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (decimal units as in ``save_pretrained``)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return int(float(number) * mult)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ConversionError(f"cannot parse size {size!r}; use e.g. '5GB', '500MB' or a byte count") from None


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, turning a missing file or bad JSON into a ``CheckpointFileError`` naming it."""
    if not path.is_file():
        raise CheckpointFileError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFileError(f"{path}: not valid JSON ({exc})") from None


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # the file (relative to the folder) that holds it


class HFWeightReader:
    """Lazy, per-tensor access to the weights of a Hugging Face model folder.

    Usage::

        with HFWeightReader(folder) as reader:
            for name in reader.names():
                t = reader.get(name)       # reads this tensor only
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointFileError(f"Hugging Face model folder not found: {self.folder}")
        self._weight_map: dict[str, str] = {}  # tensor name -> file name
        self._handles: dict[str, Any] = {}  # file name -> open safe_open handle or mmap'd state dict
        self._infos: dict[str, TensorInfo] | None = None
        self.format = self._discover()

    # -- discovery ---------------------------------------------------------------------------------------

    def _discover(self) -> str:
        f = self.folder
        if (f / SAFE_WEIGHTS_INDEX_NAME).is_file():
            self._weight_map = self._read_index(f / SAFE_WEIGHTS_INDEX_NAME)
            return "safetensors"
        if (f / SAFE_WEIGHTS_NAME).is_file():
            self._weight_map = {name: SAFE_WEIGHTS_NAME for name in self._open(SAFE_WEIGHTS_NAME).keys()}
            return "safetensors"
        if (f / TORCH_WEIGHTS_INDEX_NAME).is_file():
            self._weight_map = self._read_index(f / TORCH_WEIGHTS_INDEX_NAME)
            return "torch"
        if (f / TORCH_WEIGHTS_NAME).is_file():
            self._weight_map = {name: TORCH_WEIGHTS_NAME for name in self._open(TORCH_WEIGHTS_NAME).keys()}
            return "torch"
        present = sorted(p.name for p in f.iterdir())
        raise CheckpointFileError(
            f"no weights in {f}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} (+ shards), "
            f"{TORCH_WEIGHTS_NAME} or {TORCH_WEIGHTS_INDEX_NAME}; found: {', '.join(present) or 'nothing'}")

    def _read_index(self, path: Path) -> dict[str, str]:
        index = read_json(path, "weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFileError(f"{path}: no 'weight_map' (tensor name -> shard file) in the index")
        missing = sorted({shard for shard in weight_map.values() if not (self.folder / shard).is_file()})
        if missing:
            raise CheckpointFileError(f"{path} lists shard files that do not exist in {self.folder}: {', '.join(missing)}")
        return {str(k): str(v) for k, v in weight_map.items()}

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is not None:
            return handle
        path = self.folder / file
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # SafetensorError, OSError: corrupt header, truncated data, unreadable
                raise CheckpointFileError(f"{path}: not a valid safetensors file ({exc})") from None
        else:
            try:
                # weights_only: tensors and containers only, never arbitrary pickled objects; mmap: lazy.
                handle = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointFileError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from None
            if not isinstance(handle, dict):
                raise CheckpointFileError(f"{path}: expected a dict of tensors, found {type(handle).__name__}")
        self._handles[file] = handle
        return handle

    # -- queries -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor, read from the file header (no tensor data is read)."""
        file = self._file_of(name)
        handle = self._open(file)
        if self.format == "safetensors":
            try:
                sl = handle.get_slice(name)
            except Exception:
                raise CheckpointFileError(f"{self.folder / file}: the index says it holds {name!r}, but it does not") from None
            return TensorInfo(name, tuple(int(d) for d in sl.get_shape()), dtype_from_safetensors(sl.get_dtype()), file)
        if name not in handle:
            raise CheckpointFileError(f"{self.folder / file}: the index says it holds {name!r}, but it does not")
        t = handle[name]
        return TensorInfo(name, tuple(t.shape), t.dtype, file)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from disk now (a fresh CPU tensor; nothing else is loaded)."""
        file = self._file_of(name)
        handle = self._open(file)
        try:
            if self.format == "safetensors":
                return handle.get_tensor(name)
            return handle[name].clone()
        except KeyError:
            raise CheckpointFileError(f"{self.folder / file}: the index says it holds {name!r}, but it does not") from None
        except Exception as exc:
            raise CheckpointFileError(f"{self.folder / file}: cannot read tensor {name!r} ({exc})") from None

    def _file_of(self, name: str) -> str:
        try:
            return self._weight_map[name]
        except KeyError:
            raise CheckpointFileError(f"tensor {name!r} is not in the weights of {self.folder}") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFWeightReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Shard:
    file: str
    tensors: list[PlannedTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _header_bytes(tensors: Sequence[PlannedTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": safetensors_dtype(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw


class StreamingSafetensorsWriter:
    """Write a planned set of tensors as safetensors shards, one tensor at a time, in plan order.

    ``write(name, tensor)`` must be called for every planned tensor in the planned order with the planned
    shape and dtype; ``close()`` checks that all were written and writes the index (several shards).
    """

    def __init__(self, folder: str | Path, plan: Sequence[PlannedTensor], max_shard_bytes: int | str = "5GB") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ConversionError(f"duplicate tensor names in the write plan: {dup}")
        self.max_shard_bytes = parse_size(max_shard_bytes)
        self.shards = self._split(list(plan))
        self._order: Iterator[tuple[int, PlannedTensor]] = iter(
            (i, t) for i, shard in enumerate(self.shards) for t in shard.tensors)
        self._current: int | None = None
        self._stream: Any = None
        self._remaining_in_shard = 0
        self.bytes_written = 0
        self.files_written: list[str] = []

    def _split(self, plan: list[PlannedTensor]) -> list[_Shard]:
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            # A tensor larger than the limit gets a shard of its own (as save_pretrained does).
            if groups[-1] and (size + t.nbytes > self.max_shard_bytes or len(_header_bytes(groups[-1] + [t])) > _MAX_HEADER_BYTES):
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        if len(groups) == 1:
            return [_Shard(SAFE_WEIGHTS_NAME, groups[0])]
        n = len(groups)
        return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def _start_shard(self, index: int) -> None:
        shard = self.shards[index]
        path = self.folder / (shard.file + ".partial")
        self._stream = open(path, "wb")
        header = _header_bytes(shard.tensors)
        self._stream.write(struct.pack("<Q", len(header)))
        self._stream.write(header)
        self._current = index
        self._remaining_in_shard = len(shard.tensors)

    def _finish_shard(self) -> None:
        assert self._current is not None and self._stream is not None
        shard = self.shards[self._current]
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None
        os.replace(self.folder / (shard.file + ".partial"), self.folder / shard.file)
        self.files_written.append(shard.file)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            index, planned = next(self._order)
        except StopIteration:
            raise ConversionError(f"tensor {name!r} written after the whole plan was written") from None
        if name != planned.name:
            raise ConversionError(f"tensors out of plan order: got {name!r}, expected {planned.name!r}")
        if tuple(tensor.shape) != planned.shape:
            raise ConversionError(f"shape mismatch for {name}: planned {list(planned.shape)}, got {list(tensor.shape)}")
        if tensor.dtype != planned.dtype:
            raise ConversionError(f"dtype mismatch for {name}: planned {planned.dtype}, got {tensor.dtype}")
        if self._current != index:
            if self._current is not None:
                self._finish_shard()
            self._start_shard(index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != planned.nbytes:  # cannot happen for a matching shape/dtype; guards the byte view
            raise ConversionError(f"{name}: {data.numel()} bytes, expected {planned.nbytes}")
        self._stream.write(memoryview(data.numpy()))
        self.bytes_written += planned.nbytes
        self._remaining_in_shard -= 1

    def close(self) -> list[str]:
        """Finish the last shard, check completeness, write the index when sharded; return the files written."""
        leftover = [t.name for _, t in self._order]
        if self._current is not None and self._remaining_in_shard == 0 and self._stream is not None:
            self._finish_shard()
        if leftover:
            raise ConversionError(f"{len(leftover)} planned tensors were never written, first: {leftover[:5]}")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t.name: s.file for s in self.shards for t in s.tensors}}
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            self.files_written.append(SAFE_WEIGHTS_INDEX_NAME)
        return list(self.files_written)

    def abort(self) -> None:
        """Close and delete the partial file of an interrupted write (finished shards are left in place)."""
        if self._stream is not None and self._current is not None:
            self._stream.close()
            self._stream = None
            (self.folder / (self.shards[self._current].file + ".partial")).unlink(missing_ok=True)
