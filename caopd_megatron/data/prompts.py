"""Prompt records: the schema, a validating JSONL loader/writer, and adapters for the paper's eval sets.

Design decisions:
- One schema for every task family: ``id``, ``question``, ``reference``, ``task`` (required, non-empty
  strings), an optional privileged ``demonstration`` and a free-form ``meta`` dict. The verifier is chosen
  by ``task`` at grading time, so the loader does not consult the task registry (tasks registered by user
  code after import would otherwise be rejected).
- Records validate themselves in ``__post_init__``, so an invalid record cannot exist whether it came from
  a file or from code; the loader turns those errors into "file:line: message".
- Unknown top-level fields are kept in ``meta`` rather than rejected: source datasets carry extra columns
  (difficulty, source, split) that are useful for analysis and harmless for training. A field that
  appears both at top level and inside an explicit ``meta`` object is an error, since either choice would
  silently drop a value.
- The file is read as bytes and decoded line by line, so a bad UTF-8 sequence is reported with its line
  number like any other error; a leading BOM is tolerated. Blank lines are ignored but still counted, so
  line numbers match what an editor shows.
- ``on_error="fatal"`` raises at the first bad line; ``"skip"`` drops bad lines and lists every error in
  the LoadReport. Either way a file that yields no records is an error: training or evaluating on an
  empty set is never what the user meant.
- ``write_prompts`` writes ``meta`` as a nested object (never flattened, so meta keys cannot collide with
  schema fields), omits empty optional fields, checks id uniqueness so a written file always loads, and
  writes through a temporary file so a crash never leaves a half-written prompt file behind.
- Eval-set adapters are strict (they raise on the first bad record): those files are fixed inputs, and a
  schema drift should stop the run. Their ids are "<task>-<record index>", stable for a given file.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, get_args

from caopd_megatron.config.schema import OnBadRow

__all__ = [
    "CHEMISTRY_MCQ_TASK",
    "TOOLUSE_TASK",
    "LoadReport",
    "PromptDataError",
    "PromptRecord",
    "load_chemistry_mcq",
    "load_prompts",
    "load_tooluse",
    "write_prompts",
]

CHEMISTRY_MCQ_TASK = "chemistry_mcq"
TOOLUSE_TASK = "tooluse"

_REQUIRED_FIELDS = ("id", "question", "reference", "task")
_OPTIONAL_FIELDS = ("demonstration", "meta")
_MCQ_LETTERS = ("A", "B", "C", "D")


class PromptDataError(ValueError):
    """A prompt file or record is invalid; the message names the file and line where known."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: what the student is asked, what the verifier compares with, and the task family."""

    id: str
    question: str
    reference: str  # reference answer, what the verifier compares with
    task: str  # task family name, selects the verifier
    demonstration: str | None = None  # optional privileged demonstration for the teacher
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _REQUIRED_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise PromptDataError(f"field {name!r} must be a string, got {_json_type(value)}")
            if not value.strip():
                raise PromptDataError(f"field {name!r} must not be empty")
        if self.demonstration is not None and not isinstance(self.demonstration, str):
            raise PromptDataError(
                f"field 'demonstration' must be a string or null, got {_json_type(self.demonstration)}"
            )
        if not isinstance(self.meta, dict):
            raise PromptDataError(f"field 'meta' must be an object, got {_json_type(self.meta)}")
        # A private copy: the record is frozen, so it should not share a mutable dict with its caller.
        object.__setattr__(self, "meta", dict(self.meta))

    def to_json_dict(self) -> dict[str, Any]:
        """The JSONL form written by ``write_prompts``; empty optional fields are left out."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _REQUIRED_FIELDS}
        if self.demonstration is not None:
            out["demonstration"] = self.demonstration
        if self.meta:
            out["meta"] = self.meta
        return out

    @classmethod
    def from_json_dict(cls, obj: Any) -> "PromptRecord":
        """Build a record from one parsed JSONL object; unknown fields go to ``meta``."""
        if not isinstance(obj, dict):
            raise PromptDataError(f"expected a JSON object, got {_json_type(obj)}")
        missing = [name for name in _REQUIRED_FIELDS if name not in obj]
        if missing:
            raise PromptDataError(f"missing required field(s): {', '.join(missing)}")
        meta = obj.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise PromptDataError(f"field 'meta' must be an object, got {_json_type(meta)}")
        extras = {k: v for k, v in obj.items() if k not in _REQUIRED_FIELDS and k not in _OPTIONAL_FIELDS}
        clashes = sorted(set(extras) & set(meta))
        if clashes:
            raise PromptDataError(
                f"field(s) {', '.join(map(repr, clashes))} appear both at top level and inside 'meta'"
            )
        return cls(
            id=obj["id"],
            question=obj["question"],
            reference=obj["reference"],
            task=obj["task"],
            demonstration=obj.get("demonstration"),
            meta={**meta, **extras},
        )


@dataclass
class LoadReport:
    """What ``load_prompts`` read: counts and one "file:line: message" entry per skipped line."""

    path: str
    n_ok: int = 0
    n_skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {self.n_ok} record(s) loaded, {self.n_skipped} skipped"
        if self.errors:
            shown = self.errors[:5]
            more = len(self.errors) - len(shown)
            text += "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")
        return text


def _json_type(value: Any) -> str:
    """JSON-flavoured type names read better in data errors than Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _read_lines(path: str | Path) -> tuple[Path, list[bytes]]:
    p = Path(path)
    if not p.exists():
        raise PromptDataError(f"prompt file not found: {p}")
    if not p.is_file():
        raise PromptDataError(f"prompt path is not a file: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PromptDataError(f"cannot read prompt file {p}: {exc.strerror or exc}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # Split on \n only (not str.splitlines) so line numbers agree with editors and `sed -n Np`.
    return p, data.split(b"\n")


def _iter_json_lines(path: str | Path):
    """Yield (path, line_no, parsed_object_or_exception) for each non-blank line."""
    p, lines = _read_lines(path)
    for line_no, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield p, line_no, PromptDataError(f"invalid UTF-8 at byte {exc.start}")
            continue
        if not text.strip():
            continue
        try:
            yield p, line_no, json.loads(text)
        except json.JSONDecodeError as exc:
            yield p, line_no, PromptDataError(f"invalid JSON: {exc.msg} (column {exc.colno})")
        except RecursionError:
            yield p, line_no, PromptDataError("invalid JSON: nested too deeply")


def load_prompts(
    path: str | Path, on_error: OnBadRow = "fatal"
) -> tuple[list[PromptRecord], LoadReport]:
    """Load prompt records from a JSONL file (one object per line, blank lines ignored).

    ``on_error="fatal"`` raises PromptDataError at the first bad line; ``"skip"`` drops bad lines and
    reports them in the returned LoadReport.
    """
    if on_error not in get_args(OnBadRow):
        raise ValueError(f"on_error must be one of {get_args(OnBadRow)}, got {on_error!r}")
    report = LoadReport(path=str(path))
    records: list[PromptRecord] = []
    first_line_of: dict[str, int] = {}
    for p, line_no, item in _iter_json_lines(path):
        try:
            if isinstance(item, Exception):
                raise item
            rec = PromptRecord.from_json_dict(item)
            if rec.id in first_line_of:
                raise PromptDataError(f"duplicate id {rec.id!r} (first seen on line {first_line_of[rec.id]})")
        except PromptDataError as exc:
            message = f"{p}:{line_no}: {exc}"
            if on_error == "fatal":
                raise PromptDataError(message) from None
            report.errors.append(message)
            report.n_skipped += 1
            continue
        first_line_of[rec.id] = line_no
        records.append(rec)
    report.n_ok = len(records)
    if not records:
        detail = f"; {report.n_skipped} line(s) skipped, first error: {report.errors[0]}" if report.errors else ""
        raise PromptDataError(f"{path}: no prompt records found{detail}")
    return records, report


def write_prompts(records: Iterable[PromptRecord], path: str | Path) -> None:
    """Write records as JSONL that ``load_prompts`` reads back to equal records."""
    p = Path(path)
    lines: list[str] = []
    seen: set[str] = set()
    for index, rec in enumerate(records):
        if not isinstance(rec, PromptRecord):
            raise TypeError(f"record {index} is a {type(rec).__name__}, expected PromptRecord")
        if rec.id in seen:
            raise PromptDataError(f"cannot write {p}: duplicate id {rec.id!r} (record {index})")
        seen.add(rec.id)
        try:
            lines.append(json.dumps(rec.to_json_dict(), ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise PromptDataError(f"cannot write {p}: record {rec.id!r} has a non-JSON meta value: {exc}") from None
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("".join(line + "\n" for line in lines))
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --- adapters for the paper's public evaluation sets -------------------------------------------------


def _render_chat(messages: Any) -> str:
    """Chat messages to one plain-text prompt: the contents in order, each stripped, blank-line separated."""
    if not isinstance(messages, list) or not messages:
        raise PromptDataError(f"field 'prompt' must be a non-empty array of chat messages, got {_json_type(messages)}")
    parts: list[str] = []
    roles: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PromptDataError(f"prompt message {i} must be an object, got {_json_type(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ("system", "user"):
            raise PromptDataError(f"prompt message {i} has role {role!r}; expected 'system' or 'user'")
        if not isinstance(content, str):
            raise PromptDataError(f"prompt message {i} content must be a string, got {_json_type(content)}")
        roles.append(role)
        if content.strip():
            parts.append(content.strip())
    if "user" not in roles:
        raise PromptDataError("prompt has no user message")
    return "\n\n".join(parts)


def load_chemistry_mcq(path: str | Path) -> list[PromptRecord]:
    """Load the chemistry MCQ eval set (fields ``prompt``: chat messages, ``answer``: gold letter A-D).

    ``question`` is the system and user contents joined by a blank line; the original messages are kept
    in ``meta["messages"]`` for chat-template rendering.
    """
    records: list[PromptRecord] = []
    for index, (p, line_no, item) in enumerate(_iter_json_lines(path)):
        try:
            if isinstance(item, Exception):
                raise item
            if not isinstance(item, dict):
                raise PromptDataError(f"expected a JSON object, got {_json_type(item)}")
            missing = [k for k in ("prompt", "answer") if k not in item]
            if missing:
                raise PromptDataError(f"missing required field(s): {', '.join(missing)}")
            answer = item["answer"]
            if not isinstance(answer, str) or answer.strip().upper() not in _MCQ_LETTERS:
                raise PromptDataError(f"field 'answer' must be one of A, B, C, D; got {answer!r}")
            extras = {k: v for k, v in item.items() if k not in ("prompt", "answer")}
            records.append(
                PromptRecord(
                    id=f"{CHEMISTRY_MCQ_TASK}-{index}",
                    question=_render_chat(item["prompt"]),
                    reference=answer.strip().upper(),
                    task=CHEMISTRY_MCQ_TASK,
                    meta={**extras, "messages": item["prompt"]},
                )
            )
        except PromptDataError as exc:
            raise PromptDataError(f"{p}:{line_no}: {exc}") from None
    if not records:
        raise PromptDataError(f"{path}: no chemistry MCQ records found")
    return records


def load_tooluse(path: str | Path) -> list[PromptRecord]:
    """Load the tool-use eval set (``prompt`` text, ``golden_answer`` list of {Action, Action_Input}).

    ``reference`` is ``json.dumps(golden_answer)``; each golden Action_Input must parse as JSON, so a
    broken reference fails here rather than in the middle of grading. Other fields (name, description,
    instruction, ...) go to ``meta``.
    """
    from caopd_megatron.data.tasks.tooluse import parse_golden_calls

    records: list[PromptRecord] = []
    for index, (p, line_no, item) in enumerate(_iter_json_lines(path)):
        try:
            if isinstance(item, Exception):
                raise item
            if not isinstance(item, dict):
                raise PromptDataError(f"expected a JSON object, got {_json_type(item)}")
            missing = [k for k in ("prompt", "golden_answer") if k not in item]
            if missing:
                raise PromptDataError(f"missing required field(s): {', '.join(missing)}")
            prompt = item["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptDataError(f"field 'prompt' must be a non-empty string, got {_json_type(prompt)}")
            reference = json.dumps(item["golden_answer"])
            try:
                parse_golden_calls(reference)
            except ValueError as exc:
                raise PromptDataError(f"field 'golden_answer': {exc}") from None
            extras = {k: v for k, v in item.items() if k not in ("prompt", "golden_answer")}
            records.append(
                PromptRecord(
                    id=f"{TOOLUSE_TASK}-{index}",
                    question=prompt,
                    reference=reference,
                    task=TOOLUSE_TASK,
                    meta=extras,
                )
            )
        except PromptDataError as exc:
            raise PromptDataError(f"{p}:{line_no}: {exc}") from None
    if not records:
        raise PromptDataError(f"{path}: no tool-use records found")
    return records
