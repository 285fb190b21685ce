"""The on-policy training loop: rollout -> grade + rewrite -> distill -> teacher update, step after step.

Design decisions:
- One loop serves OPD and CaOPD: the only difference is ``calibration.rewrite``. The rollouts come from the
  ``rollout.prefix_source`` model (``rollout.engine.prefix_rollout``); each step's diagnostics
  (``distill.step_diagnostics``) join its log row.
- Prompts are visited in a shuffled order per epoch (seeded); the cursor is part of the data position that
  checkpoints save, so a resumed run sees exactly the prompts an uninterrupted run would.
- ``teacher.replay_fraction`` > 0 (useful with an EMA teacher): the student also trains with cross entropy on
  teacher-format rows, as many as that share of the step's examples, so the EMA of the student keeps reading
  privileged context (the student otherwise never sees privileged prompts and an EMA teacher forgets how to
  use them). The rows come from a ``ReplaySource``: by default the step's own revised examples in the
  teacher's format (privileged prompt -> revised response); the embedded default replays its warm-up's
  teacher-format rows instead, which leave the OPD baseline's privileged context as it is.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from caopd_megatron.calibration.revise import revise
from caopd_megatron.checkpointing.run_dir import TRAIN_LOG, trim_log
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.records import DistillExample
from caopd_megatron.distill.optim import build_optimizer, build_scheduler
from caopd_megatron.distill.sft import SupervisedRows
from caopd_megatron.distill.step import distill_step
from caopd_megatron.distill.step_diagnostics import StepDiagnostics, marker_patterns
from caopd_megatron.models.teacher import ema_update
from caopd_megatron.rollout.engine import prefix_rollout
from caopd_megatron.runtime.distributed import is_main_rank
from caopd_megatron.runtime.guard import CollapseWatch, at_step, json_number
from caopd_megatron.runtime.progress import ExperimentTracker, close_bar, progress

log = logging.getLogger(__name__)


@dataclass
class PromptCursor:
    """Deterministic epoch-shuffled iteration over prompt indices; its state is checkpointable."""

    n: int
    seed: int
    epoch: int = 0
    pos: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _shuffle(self) -> None:
        self._order = list(range(self.n))
        random.Random(self.seed + self.epoch).shuffle(self._order)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self._order:
                self._shuffle()
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._shuffle()


@dataclass
class StepLog:
    step: int
    loss: float
    grad_norm: float
    lr: float
    accuracy: float  # rollout accuracy of this step's samples
    stated_confidence: float  # mean confidence the student stated (missing = 0)
    empirical_confidence: float  # mean p over the step's prompts
    # Diagnostics (distill.diagnostics; distill/step_diagnostics.py): token means over answer / confidence tokens.
    answer_student_entropy: Optional[float] = None
    answer_teacher_entropy: Optional[float] = None
    answer_divergence: Optional[float] = None
    answer_teacher_tail: Optional[float] = None  # teacher mass outside the student's top-k
    answer_advantage_sd: Optional[float] = None  # vOPD only
    confidence_student_entropy: Optional[float] = None
    confidence_teacher_entropy: Optional[float] = None
    confidence_divergence: Optional[float] = None
    confidence_teacher_tail: Optional[float] = None
    confidence_advantage_sd: Optional[float] = None

    @classmethod
    def of(cls, step: int, stats, examples: list[DistillExample]) -> "StepLog":
        """The log entry of a step from its distillation statistics and its revised examples."""
        n = max(1, len(examples))
        return cls(step=step, loss=stats.loss, grad_norm=stats.grad_norm, lr=stats.lr,
                   accuracy=sum(e.correct for e in examples) / n,
                   stated_confidence=sum((e.stated_confidence or 0.0) for e in examples) / n,
                   empirical_confidence=sum(e.empirical_confidence for e in examples) / n, **stats.diagnostics)


# (student, the step's revised examples, number of rows) -> the replay rows, as data (``SupervisedRows``) so
# that the pipeline-parallel step can schedule them; the distillation step computes their loss.
ReplaySource = Callable[[object, list[DistillExample], int], SupervisedRows]


def revised_examples_replay(pad_id: int, real_vocab_size: int, seed: int) -> ReplaySource:
    """Replay ``n`` of the step's revised examples in the teacher's format (privileged prompt -> response)."""
    def rows(student, examples: list[DistillExample], n: int) -> SupervisedRows:
        chosen = random.Random(seed + len(examples)).sample(examples, min(n, len(examples)))
        return SupervisedRows([e.teacher_prompt_ids for e in chosen], [e.response_ids for e in chosen], pad_id)
    return rows


def short_diagnostics(entry: StepLog) -> dict[str, str]:
    """The progress bar's diagnostics: confidence-token student entropy and answer-token teacher tail."""
    shown = {"H_conf": entry.confidence_student_entropy, "tail": entry.answer_teacher_tail}
    return {name: f"{value:.2f}" for name, value in shown.items() if value is not None}


class Trainer:
    def __init__(self, cfg: CaOPDConfig, student, teacher, tokenizer, real_vocab_size: int,
                 prompts: list[PromptRecord], run_dir: Path, replay: ReplaySource | None = None) -> None:
        self.cfg, self.student, self.teacher, self.tok = cfg, student, teacher, tokenizer
        self.real_vocab = real_vocab_size
        self.prompts = prompts
        self.by_id = {p.id: p for p in prompts}
        self.run_dir = Path(run_dir)
        self.optimizer = build_optimizer(student, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.distill.steps)
        self.cursor = PromptCursor(len(prompts), cfg.run.seed)
        self.replay = replay or revised_examples_replay(tokenizer.pad_id, real_vocab_size, cfg.run.seed)
        self.tracker = ExperimentTracker(cfg.logging.wandb, self.run_dir, asdict(cfg))
        self.step = 0
        self.history: list[StepLog] = []
        self.diagnostics = (StepDiagnostics(marker_patterns(tokenizer, cfg.calibration.marker), cfg.distill.top_k)
                            if cfg.distill.diagnostics else None)
        self._written = 0  # history entries already appended to train_log.jsonl
        d = cfg.distill
        self.collapse = CollapseWatch(d.collapse_loss, d.collapse_grad_norm, d.collapse_steps)

    def train_step(self) -> StepLog:
        """One on-policy step: rollout of the next prompts, grading + rewrite, then ``learn``."""
        cfg = self.cfg
        batch = [self.prompts[i] for i in self.cursor.take(cfg.rollout.prompts_per_step)]
        rolls = prefix_rollout(self.student, self.teacher, batch, self.tok, cfg, self.real_vocab, step=self.step)
        return self.learn(revise(rolls, self.by_id, self.tok, cfg.data, cfg.calibration))

    def learn(self, examples: list[DistillExample]) -> StepLog:
        """Distil on ``examples`` (with this step's replay rows), update an EMA teacher, log, count the step.

        The ``distill`` CLI phase calls this with examples read from disk; ``train_step`` with fresh ones.
        """
        cfg = self.cfg
        n_replay = round(cfg.teacher.replay_fraction * len(examples))
        extra = self.replay(self.student, examples, n_replay) if n_replay else None
        with at_step(self.step):  # a non-finite loss/grad norm stops here, before the update
            stats = distill_step(self.student, self.teacher, self.optimizer, self.scheduler, examples, cfg.distill,
                                 self.tok.pad_id, self.real_vocab, extra_loss=extra, diagnostics=self.diagnostics)
        if cfg.teacher.mode == "ema":
            ema_update(self.teacher, self.student, cfg.teacher.ema_rate)
        entry = StepLog.of(self.step, stats, examples)
        self.step += 1
        self.history.append(entry)
        warning = self.collapse.observe(entry.step, entry.loss, entry.grad_norm)
        if warning:
            log.warning(warning)
        self.tracker.log(entry.step, asdict(entry))
        return entry

    def train(self, steps: int | None = None, desc: str = "distill",
              at_step_end: Callable[[], None] | None = None) -> list[StepLog]:
        """``steps`` on-policy steps, then the log appended to ``train_log.jsonl``. ``at_step_end`` runs after every
        step (the demo's stop check): when it raises, the loop ends there and nothing is written."""
        steps = self.cfg.distill.steps if steps is None else steps
        bar = progress(range(steps), desc=desc, unit="step")
        try:
            for _ in bar:
                e = self.train_step()
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{e.loss:.3f}", acc=f"{e.accuracy:.2f}", conf=f"{e.stated_confidence:.2f}",
                                    **short_diagnostics(e))
                if self.cfg.logging.log_interval and e.step % self.cfg.logging.log_interval == 0:
                    log.info("%s step %d: loss %.4f acc %.3f stated conf %.3f empirical %.3f lr %.2e", desc, e.step,
                             e.loss, e.accuracy, e.stated_confidence, e.empirical_confidence, e.lr)
                if at_step_end is not None:
                    at_step_end()
        finally:
            close_bar(bar)
        self.write_history()
        return self.history

    @property
    def log_path(self) -> Path:
        return self.run_dir / TRAIN_LOG

    def write_history(self) -> Path:
        """Append the entries logged since the last call (a resumed job continues the same file).

        Main rank only: every rank holds the same history, one writer keeps the file free of duplicates.
        Non-finite floats are written as the strings "NaN" / "Infinity" / "-Infinity": every line is JSON.
        """
        if is_main_rank():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                for e in self.history[self._written:]:
                    row = {k: json_number(v) if isinstance(v, float) else v for k, v in asdict(e).items()}
                    f.write(json.dumps(row, allow_nan=False) + "\n")
        self._written = len(self.history)
        return self.log_path

    def truncate_history(self, step: int) -> None:
        """On resume from ``step``: drop logged entries of steps the checkpoint does not contain (main rank)."""
        if is_main_rank():
            trim_log(self.log_path, step)
