"""Phase files on disk: rollouts and revised examples as JSONL (or Parquet), one dataclass per row.

Design decisions:
- Phases communicate through files so a cluster launcher can run rollout, rewrite and distill as separate
  jobs; the row types are the dataclasses the in-process pipeline uses, so both paths share one schema.
- Writes are atomic (temp file + rename): a killed job never leaves a truncated file that the next phase
  would half-read. Reads report the file and line of a bad row.
- Parquet is optional (needs pyarrow); the format follows the file suffix.
- Reads check every field against the row type's annotations (``response_ids`` given as a string is an
  error, not a list of characters), every ``*_ids`` list against the run's vocabulary when the caller passes
  its size (ids from another tokenizer would index past the embedding deep inside torch), and, for the
  phases, refuse an empty file (an empty revised file would checkpoint a step that trained nothing).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Type, TypeVar

T = TypeVar("T")


class RecordFileError(ValueError):
    """A phase file is missing or malformed; the message names the file and line."""


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise RecordFileError("Parquet output needs pyarrow: `pip install pyarrow` or use a .jsonl file") from None
    return pq


def write_records(path: str | Path, rows: Iterable) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    dicts = [dataclasses.asdict(r) for r in rows]
    if path.suffix == ".parquet":
        pq = _pyarrow()  # first: a missing pyarrow must raise RecordFileError, not ModuleNotFoundError
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(dicts), tmp)
    else:
        with open(tmp, "w") as f:
            for d in dicts:
                f.write(json.dumps(d) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _matches(value: Any, kind: Any) -> bool:
    """Does a parsed JSON value fit the annotation ``kind`` (int, float, bool, str, list[X], X | None)?"""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if origin is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_row(d: dict, hints: dict[str, Any], vocab_size: int | None) -> str | None:
    for name, value in d.items():
        kind = hints[name]
        if not _matches(value, kind):
            return f"field {name!r} must be {kind.__name__ if isinstance(kind, type) else kind}, got {_type_name(value)}"
        if vocab_size is not None and name.endswith("_ids"):
            bad = next((t for t in value if not 0 <= t < vocab_size), None)
            if bad is not None:
                return (f"field {name!r} holds token id {bad}, outside this run's vocabulary (0..{vocab_size - 1}): "
                        f"the file was written with another tokenizer")
    return None


def read_records(path: str | Path, cls: Type[T], vocab_size: int | None = None, allow_empty: bool = True) -> list[T]:
    """Rows of ``cls`` from a JSONL/Parquet phase file, type-checked, token ids checked against
    ``vocab_size`` (the run's real vocabulary) when given; ``allow_empty=False``: no rows is an error."""
    path = Path(path)
    if not path.is_file():
        raise RecordFileError(f"{path}: file not found")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    if path.suffix == ".parquet":
        items = list(enumerate(_pyarrow().read_table(path).to_pylist(), start=1))
    else:
        items = []
        with open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise RecordFileError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    out = []
    for lineno, d in items:
        if not isinstance(d, dict):
            raise RecordFileError(f"{path}:{lineno}: expected a JSON object")
        unknown = set(d) - names
        if unknown:
            raise RecordFileError(f"{path}:{lineno}: unknown field(s) {sorted(unknown)} for {cls.__name__}")
        problem = _check_row(d, hints, vocab_size)
        if problem:
            raise RecordFileError(f"{path}:{lineno}: {problem}")
        try:
            out.append(cls(**d))
        except TypeError as exc:
            raise RecordFileError(f"{path}:{lineno}: {exc}") from None
    if not out and not allow_empty:
        raise RecordFileError(f"{path}: no {cls.__name__} rows (an empty phase file is an error, not a no-op step)")
    return out
