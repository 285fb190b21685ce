"""Tool use (ToolAlpaca-style): parse ``Action`` / ``Action Input`` calls and compare with the golden list.

The prompts ask for the ReAct format::

    Thought: ...
    Action: <tool name>
    Action Input: <JSON>

Design decisions:
- Whole-sequence grading: the response must contain the same number of calls as the golden answer, in
  the same order, with the same names and JSON-equal inputs. (The paper's own evaluation script checks
  only the first call; grading every call is stricter and is what multi-call records actually ask for.)
- Parsing is a left-to-right scan over the answer part (text before the confidence marker) for lines
  starting with ``Action:`` or ``Action Input:``. Each input is decoded with ``json.JSONDecoder.raw_decode``
  from just after its colon, so multi-line (pretty-printed) JSON works, trailing text such as
  "Observation: ..." is ignored, and the scan resumes after the JSON, so text inside it is never mistaken
  for a new call. A json/JSON code fence around the input is tolerated.
- Any structural problem (an Action without an input, an input without an Action, JSON that does not
  parse, an empty tool name) makes the response incorrect; the verifier never raises for model text and
  never evaluates it as code.
- JSON equality is type-aware: ``true`` is not ``1`` (Python's ``True == 1`` would say otherwise), while
  ``1`` and ``1.0`` are the same JSON number. Object key order does not matter; array order does.
- Tool names compare exactly after stripping whitespace: tool names are identifiers, and a near-miss
  name would fail against the real API.
- Golden ``Action_Input`` is a JSON string (as in the data); an already-decoded object is accepted too.
- Integers longer than ``LONG_INT_DIGITS`` are kept as their digit string (``LongJsonInt``), never passed
  to ``int``: Python refuses str->int beyond 4,300 digits (a ValueError that used to escape the grader)
  and the conversion is quadratic below that limit. Two long integers are equal when their digits are.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from caopd_megatron.data.tasks.base import extract_answer, register_normaliser, register_task

__all__ = [
    "TASK_NAME",
    "LongJsonInt",
    "ToolCall",
    "format_tool_calls",
    "json_equal",
    "normalise_tooluse",
    "parse_golden_calls",
    "parse_tool_calls",
    "verify_tooluse",
]

TASK_NAME = "tooluse"

# "Action Input" must be tried before "Action": the alternation order makes the longer keyword win.
_KEYWORD = re.compile(r"^[ \t]*(Action[ \t]*Input|Action_Input|Action)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_FENCE_OPEN = re.compile(r"```(?:json)?[ \t]*\n?", re.IGNORECASE)
LONG_INT_DIGITS = 1000


@dataclass(frozen=True)
class LongJsonInt:
    """A JSON integer with more than ``LONG_INT_DIGITS`` digits, kept as text (sign included)."""

    literal: str


def _parse_json_int(literal: str) -> int | LongJsonInt:
    return int(literal) if len(literal) <= LONG_INT_DIGITS else LongJsonInt(literal)


_DECODER = json.JSONDecoder(parse_int=_parse_json_int)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any  # the decoded JSON input (normally an object)


def parse_tool_calls(response: str) -> list[ToolCall] | None:
    """The calls in ``response`` in order, or None when the Action/Action Input structure is malformed."""
    text = extract_answer(response)
    calls: list[ToolCall] = []
    pending_name: str | None = None
    pos = 0
    while True:
        match = _KEYWORD.search(text, pos)
        if match is None:
            break
        is_input = match.group(1).lower() != "action"
        if not is_input:
            if pending_name is not None:
                return None  # previous Action never got its input
            line_end = text.find("\n", match.end())
            line_end = len(text) if line_end < 0 else line_end
            pending_name = text[match.end() : line_end].strip()
            if not pending_name:
                return None
            pos = line_end
            continue
        if pending_name is None:
            return None  # an input with no Action before it
        start = match.end()
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        fenced = _FENCE_OPEN.match(text, start)
        if fenced:
            start = fenced.end()
        try:
            value, end = _DECODER.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            return None
        calls.append(ToolCall(pending_name, value))
        pending_name = None
        pos = end
    if pending_name is not None:
        return None
    return calls


def parse_golden_calls(reference: str) -> list[ToolCall]:
    """Decode a reference (``json.dumps`` of the golden list); a malformed reference raises ValueError."""
    try:
        golden = _DECODER.decode(reference)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tooluse reference is not valid JSON: {exc.msg}") from None
    if not isinstance(golden, list):
        raise ValueError(f"tooluse reference must be a JSON array of calls, got {type(golden).__name__}")
    calls: list[ToolCall] = []
    for i, item in enumerate(golden):
        if not isinstance(item, dict) or "Action" not in item or "Action_Input" not in item:
            raise ValueError(f"golden call {i} must be an object with 'Action' and 'Action_Input'")
        name, raw = item["Action"], item["Action_Input"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"golden call {i} has an empty or non-string 'Action'")
        if isinstance(raw, str):
            try:
                arguments = _DECODER.decode(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"golden call {i} Action_Input is not valid JSON: {exc.msg}") from None
        else:
            arguments = raw
        calls.append(ToolCall(name.strip(), arguments))
    return calls


def json_equal(a: Any, b: Any) -> bool:
    """Equality of decoded JSON values that keeps booleans, numbers and null apart."""
    if isinstance(a, LongJsonInt) or isinstance(b, LongJsonInt):
        return a == b  # dataclass equality: both long, same literal
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def format_tool_calls(calls: Sequence[ToolCall] | str, thought: str = "I should call a tool.") -> str:
    """Render calls in the prompt's format (one Thought/Action/Action Input block per call).

    Accepts ToolCalls or a reference string. Useful for building teacher demonstrations from a golden
    answer, which the tool-use eval split carries instead of reference responses.
    """
    if isinstance(calls, str):
        calls = parse_golden_calls(calls)
    blocks = [
        f"Thought: {thought}\nAction: {call.name}\nAction Input: {json.dumps(call.arguments, ensure_ascii=False)}"
        for call in calls
    ]
    return "\n".join(blocks)


def verify_tooluse(response: str, reference: str) -> bool:
    """True when ``response`` makes exactly the golden calls, in order, with JSON-equal inputs."""
    golden = parse_golden_calls(reference)
    predicted = parse_tool_calls(response)
    if predicted is None or len(predicted) != len(golden):
        return False
    try:
        return all(p.name == g.name and json_equal(p.arguments, g.arguments) for p, g in zip(predicted, golden))
    except RecursionError:  # both sides nested deeper than the interpreter's stack: not a real call
        return False


def normalise_tooluse(response: str) -> str | None:
    """The calls as canonical JSON (action + input with sorted keys, compact), None when malformed.

    Equal strings mean equal calls for ``json_equal`` except that ``1`` and ``1.0`` stay apart (rare in tool
    inputs; self-consistency then counts them as different answers).
    """
    calls = parse_tool_calls(response)
    if calls is None:
        return None
    canonical = [{"action": c.name, "input": c.arguments} for c in calls]
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


register_task(TASK_NAME, verify_tooluse)
register_normaliser(TASK_NAME, normalise_tooluse)
