"""Phase files on disk: rollouts and revised examples as JSONL (or Parquet), one dataclass per row.

Design decisions:
- Phases communicate through files so a cluster launcher can run rollout, rewrite and distill as separate
  jobs; the row types are the dataclasses the in-process pipeline uses, so both paths share one schema.
- Writes are atomic (temp file + rename): a killed job never leaves a truncated file that the next phase
  would half-read. Reads report the file and line of a bad row.
- Parquet is optional (needs pyarrow); the format follows the file suffix.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Type, TypeVar

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


def read_records(path: str | Path, cls: Type[T]) -> list[T]:
    path = Path(path)
    if not path.is_file():
        raise RecordFileError(f"{path}: file not found")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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
        try:
            out.append(cls(**d))
        except TypeError as exc:
            raise RecordFileError(f"{path}:{lineno}: {exc}") from None
    return out
