"""Training-health guard: a diverged step is stopped before the optimizer applies it; a collapse is reported.

Design decisions:
- The decision uses the global gradient norm and the step's loss, identical on every rank (all-reduced over
  the model-parallel group, broadcast from the last stage), so all ranks stop together; a non-finite loss
  makes the norm non-finite too. ``TrainingDivergedError`` is raised before ``step()``; the CLI exits 3.
- Saving refuses non-finite tensors independently (``checkpointing/payload.py``): an fp16 weight overflowing
  in its update, invisible to the norm, is still never checkpointed.
- ``CollapseWatch``: loss and grad norm at or below thresholds for N steps is a warning (``distill.collapse_*``).
- ``json_number``: logs spell non-finite floats "NaN" / "Infinity" / "-Infinity", so every line is JSON.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator


class TrainingDivergedError(RuntimeError):
    """A training step produced a non-finite loss or gradient norm; the update was not applied."""


def check_finite_update(grad_norm: float, loss: float | None = None) -> None:
    """Raise ``TrainingDivergedError`` if ``grad_norm`` or ``loss`` is NaN or infinite (call before ``step()``)."""
    bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if bad:
        raise TrainingDivergedError(f"non-finite {' and '.join(bad)}: the optimizer step was not applied (lower "
                                    f"optim.lr, enable distill.grad_clip, or use bfloat16/float32 parameters)")


@contextmanager
def at_step(step: int) -> Iterator[None]:
    """Name the training step in a ``TrainingDivergedError`` raised inside."""
    try:
        yield
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f"training diverged at step {step}: {exc}") from None


class CollapseWatch:
    """Warns once per streak when loss <= ``loss_below`` and grad norm <= ``grad_norm_below`` for ``steps`` steps."""

    def __init__(self, loss_below: float, grad_norm_below: float, steps: int) -> None:
        self.loss_below, self.grad_norm_below, self.steps = loss_below, grad_norm_below, steps
        self.streak = 0

    def observe(self, step: int, loss: float, grad_norm: float) -> str | None:
        """The warning text when the streak reaches ``steps`` (0 = never), else None."""
        if self.steps <= 0:
            return None
        self.streak = self.streak + 1 if (loss <= self.loss_below and grad_norm <= self.grad_norm_below) else 0
        if self.streak != self.steps:
            return None
        return (f"training may have collapsed: loss <= {self.loss_below:g} and gradient norm <= "
                f"{self.grad_norm_below:g} for {self.steps} consecutive steps (through step {step}); the student "
                f"no longer learns from the teacher (check the teacher, the data and optim.lr)")


def json_number(value: float) -> float | str:
    """``value`` itself when finite, else "NaN" / "Infinity" / "-Infinity" (valid JSON strings)."""
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
