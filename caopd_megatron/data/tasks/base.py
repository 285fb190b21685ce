"""Verifier protocol, task registry and the shared answer/confidence split.

Design decisions:
- A verifier is any callable ``(response, reference) -> bool``; the registry maps a task-family name
  (the ``task`` field of a prompt record) to one. Plain functions suffice, so tasks need no base class.
- Built-in task modules register themselves on import, and the registry imports them lazily on the first
  look-up. Nothing has to be imported in a particular order, and importing ``base`` alone stays cheap
  and free of import cycles.
- Registering a different verifier under a taken name is an error unless ``overwrite=True``: a silent
  replacement would change how rewards are graded without anyone noticing. Registering the same object
  again is a no-op, so reloading a module is harmless.
- The answer part of a response is the text before the first confidence marker. Every verifier grades
  only that part, so a stated confidence can never change whether an answer is correct. The marker is
  matched case-sensitively by default, exactly like ``calibration.confidence.parse_confidence``, so the
  answer/confidence split is the same everywhere; ``ignore_case=True`` opts in, as there.
- Verifiers never evaluate model text as code (no eval/exec/ast.literal_eval); JSON parsing is the most
  they do. Model text is untrusted input.
- A verifier returns False for a malformed *response* and never raises for one; a malformed *reference*
  is a data error and raises ValueError, because grading against a broken reference silently would
  corrupt every reward for that prompt.
"""
from __future__ import annotations

import importlib
import re
from typing import Callable, Protocol, TypeVar, runtime_checkable

from caopd_megatron.config.schema import CONFIDENCE_MARKER

__all__ = [
    "UnknownTaskError",
    "Verifier",
    "extract_answer",
    "get_verifier",
    "known_tasks",
    "register_task",
]

# Modules that call register_task at import time; imported on the first registry look-up.
_BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "caopd_megatron.data.tasks.digit_sum",
    "caopd_megatron.data.tasks.chemistry_mcq",
    "caopd_megatron.data.tasks.tooluse",
)


@runtime_checkable
class Verifier(Protocol):
    """Grades one response against the record's reference answer."""

    def __call__(self, response: str, reference: str) -> bool: ...


class UnknownTaskError(KeyError):
    """Raised for a task name with no registered verifier."""

    def __str__(self) -> str:  # KeyError would otherwise print the message wrapped in quotes
        return str(self.args[0]) if self.args else ""


_REGISTRY: dict[str, Verifier] = {}
_builtins_loaded = False

V = TypeVar("V", bound=Callable[[str, str], bool])


def register_task(name: str, verifier: V | None = None, *, overwrite: bool = False):
    """Register ``verifier`` for task family ``name``.

    Usable directly, ``register_task("x", fn)``, or as a decorator, ``@register_task("x")``.
    Returns the verifier so the decorated function stays usable.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if name != name.strip():
        raise ValueError(f"task name must not have surrounding whitespace, got {name!r}")

    def _register(fn: V) -> V:
        if not callable(fn):
            raise TypeError(f"verifier for task {name!r} must be callable, got {type(fn).__name__}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn and not overwrite:
            raise ValueError(
                f"task {name!r} already has a verifier ({_describe(existing)}); "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[name] = fn
        return fn

    if verifier is None:
        return _register
    return _register(verifier)


def _describe(fn: object) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{qualname}"


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    # Set first: the modules call register_task, which must not re-enter this loader.
    _builtins_loaded = True
    for module in _BUILTIN_TASK_MODULES:
        importlib.import_module(module)


def known_tasks() -> list[str]:
    """Names of all registered task families, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_verifier(task: str) -> Verifier:
    """The verifier registered for ``task``; an unknown name raises UnknownTaskError listing the known ones."""
    _load_builtins()
    try:
        return _REGISTRY[task]
    except (KeyError, TypeError):
        raise UnknownTaskError(
            f"unknown task {task!r}; known tasks: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        ) from None


def extract_answer(response: str, marker: str = CONFIDENCE_MARKER, *, ignore_case: bool = False) -> str:
    """The answer part of ``response``: the text before the first ``marker``, stripped.

    Without a marker the whole response, stripped, is the answer.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(marker, str) or not marker:
        raise ValueError("confidence marker must be a non-empty string")
    if ignore_case:
        match = re.search(re.escape(marker), response, flags=re.IGNORECASE)
        cut = -1 if match is None else match.start()
    else:
        cut = response.find(marker)
    head = response if cut < 0 else response[:cut]
    return head.strip()
