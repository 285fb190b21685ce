"""The embedded default: the paper's finding, reproduced on a laptop CPU in a few minutes.

Story: warm up a tiny Llama-style megatron-core model (SFT) so it answers the synthetic digit-sum task,
states a confidence, and can read a privileged context. From that same start, run on-policy
self-distillation twice for the same number of steps — OPD (rewrite off) and CaOPD (rewrite on) — then
evaluate base / OPD / CaOPD on held-out questions: OPD's confidence inflates, CaOPD's tracks accuracy.

Design decisions:
- The demo's teacher is the paper's: an EMA of the student that keeps reading the privileged note because
  each step also trains the student on fresh teacher-format warm-up rows, a quarter as many as its revised
  rows (``teacher.replay_fraction=0.25``; drawn from one stream: CaOPD's rows continue where OPD's
  stopped, the same distribution but not the same rows). Without replay a tiny EMA teacher forgets
  the note within a few hundred steps; ``teacher.mode=frozen`` (a copy of the warmed-up student) avoids that
  too but missed the accuracy criterion on one seed of three (README, "What we learned").
- The demo does not clip distillation gradients (``distill.grad_clip=0``; the library default is 1.0): with
  norms of 3-15 against a clip of 1, clipping favoured OPD, whose gradient is almost all answer tokens, over
  CaOPD, whose gradient also carries the confidence tokens' divergence (seed 3: 4.4 points of OPD's accuracy
  came from clipping, CaOPD's accuracy moved 0.7; README "What we learned").
- The base, OPD and CaOPD students are saved as Megatron checkpoint directories (``base/student``,
  ``opd/student``, ``caopd/student``, tokenizer inside), so ``caopd compare`` and ``tools/export_hf.py`` take them.
- Everything (tokenizer, task, models, metrics, plots) is produced by the same code that serves real
  models; only the sizes and the synthetic task are special.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from caopd_megatron.checkpointing.hf import save_megatron_checkpoint
from caopd_megatron.checkpointing.run_dir import TRAIN_LOG
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.evaluation.diagnostics_plot import plot_diagnostics
from caopd_megatron.evaluation.evaluate import evaluate_model, write_eval
from caopd_megatron.evaluation.metrics import CalibrationReport
from caopd_megatron.evaluation.reliability import plot_reliability
from caopd_megatron.pipeline.session import (
    Session,
    build_student,
    build_teacher,
    eval_prompts,
    open_session,
    train_prompts,
)
from caopd_megatron.pipeline.train import Trainer
from caopd_megatron.pipeline.warmup import WarmupData, run_warmup, warmup_replay
from caopd_megatron.runtime.distributed import is_main_rank
from caopd_megatron.runtime.exit_codes import StopRequested
from caopd_megatron.runtime.preemption import StopGuard

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
COLUMNS = ("accuracy", "ece", "brier", "ocg", "spr", "auroc", "parse_rate")


def format_table(reports: dict[str, CalibrationReport]) -> str:
    head = f"{'model':<8}" + "".join(f"{c:>11}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for name, r in reports.items():
        d = r.to_dict()
        cells = "".join(f"{d[c]:>11.3f}" if d[c] is not None else f"{'n/a':>11}" for c in COLUMNS)
        lines.append(f"{name:<8}{cells}")
    return "\n".join(lines)


def accuracy_by_difficulty(rows) -> dict[int, float]:
    out: dict[int, list[bool]] = {}
    for r in rows:
        out.setdefault(int(r.meta.get("n_digits", 0)), []).append(r.correct)
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def save_student(s, student, name: str) -> None:
    """The student's weights as ``<run>/<name>/student`` (a Megatron checkpoint directory); every rank calls it."""
    save_megatron_checkpoint(s.run_dir / name / "student", student, s.cfg.model, real_vocab_size=s.vocab.real,
                             tokenizer_dir=s.run_dir / "tokenizer", overwrite=True)


@dataclass
class WarmStart:
    """The warmed-up student every distillation run of a process starts from (one warm-up per process).

    ``data`` is the warm-up's row source; the teacher-format replay rows continue its random stream, so a
    caller that wants each run to see the same replay rows hands each one ``data.fork()``.
    """

    cfg: CaOPDConfig
    session: Session
    train: list[PromptRecord]
    held_out: list[PromptRecord]
    student: torch.nn.Module
    data: WarmupData
    state: dict  # the student's state_dict after warm-up
    warmup_losses: list[float]


StepHook = Optional[Callable[[], None]]  # called at each step boundary (a stop check may raise StopRequested)


def warm_up(cfg: CaOPDConfig, session: Session | None = None, at_step_end: StepHook = None) -> WarmStart:
    """Build the student and run the supervised warm-up (``warmup_log.jsonl`` in the run) in ``session``
    (default: a session opened here)."""
    s = session or open_session(cfg)
    train, held_out = train_prompts(s), eval_prompts(s)
    student = build_student(s)
    data = WarmupData(train, s.tokenizer, cfg, seed=cfg.run.seed)
    losses = run_warmup(student, data, cfg, s.vocab.real, s.tokenizer.pad_id, at_step_end=at_step_end)
    if is_main_rank():
        (s.run_dir / "warmup_log.jsonl").write_text(
            "".join(json.dumps({"step": i, "loss": v}) + "\n" for i, v in enumerate(losses)))
    return WarmStart(cfg, s, train, held_out, student, data, copy.deepcopy(student.state_dict()), losses)


def distill_from_warm_start(ws: WarmStart, run_cfg: CaOPDConfig, name: str,
                            replay_data: WarmupData | None = None, at_step_end: StepHook = None) -> list[dict]:
    """Reset the student to the warm start and distil it per ``run_cfg`` (``<run>/<name lower>/``); the log rows.

    The teacher is built from the warm student (``teacher.mode`` of the session); the replay rows come from
    ``replay_data`` (default: the warm start's own row source, whose stream then moves on). The run starts
    over: an earlier run's log in the same directory is not continued.
    """
    s, student = ws.session, ws.student
    student.load_state_dict(ws.state)
    teacher = build_teacher(s, student)
    torch.manual_seed(ws.cfg.run.seed)
    trainer = Trainer(run_cfg, student, teacher, s.tokenizer, s.vocab.real, ws.train, s.run_dir / name.lower(),
                      replay=warmup_replay(replay_data or ws.data, s.vocab.real, s.tokenizer.pad_id))
    trainer.truncate_history(0)
    return [asdict(e) for e in trainer.train(desc=f"{name} distill", at_step_end=at_step_end)]


def evaluate_student(ws: WarmStart, name: str) -> tuple[CalibrationReport, dict[int, float]]:
    """Evaluate the student as it is on the held-out questions, write ``eval/<name>_*`` and save it as ``<name>``."""
    s = ws.session
    report, rows = evaluate_model(ws.student, ws.held_out, s.tokenizer, ws.cfg, s.vocab.real, desc=f"evaluate {name}")
    if is_main_rank():  # every rank evaluated the same generations; one writes them
        write_eval(s.run_dir / "eval", name.lower(), report, rows)
    save_student(s, ws.student, name.lower())
    return report, accuracy_by_difficulty(rows)


class DemoProgress:
    """The stage the demo is in and the outputs it has finished (relative to the run directory), for the one
    line an interrupted demo ends with."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stage = "start-up"
        self.kept: list[str] = []

    def interrupted(self, stop: StopRequested) -> StopRequested:
        kept = ", ".join(self.kept) or "nothing"
        return StopRequested(stop.code, f"{stop} during {self.stage}: stopped at a step boundary; kept in "
                                        f"{self.run_dir}: {kept}; the demo does not resume, run `caopd demo` "
                                        "again (same options) to start over")


def run_demo(cfg: CaOPDConfig) -> dict:
    """The whole demo; returns the summary. A stop signal (``run.stop_signals``: Ctrl-C, SIGTERM, SIGUSR1)
    ends it at the next warm-up or distillation step boundary with ``StopRequested`` naming what was kept: the
    files of finished stages, each complete; the interrupted stage writes nothing."""
    with StopGuard(cfg.run.stop_signals) as guard:
        s = open_session(cfg)
        done = DemoProgress(s.run_dir)
        try:
            return demo_stages(s, guard, done)
        except StopRequested as stop:
            raise done.interrupted(stop) from None


def demo_stages(s: Session, guard: StopGuard, done: DemoProgress) -> dict:
    cfg = s.cfg
    if is_main_rank():  # an earlier demo's summary would describe another run until this one ends
        for stale in (SUMMARY, "reliability.png", "diagnostics.png"):
            (s.run_dir / stale).unlink(missing_ok=True)
    done.stage = "warm-up"
    ws = warm_up(cfg, s, at_step_end=guard.raise_if_stopping)
    done.kept.append("warmup_log.jsonl")
    held_out = ws.held_out
    reports: dict[str, CalibrationReport] = {}
    difficulty: dict[str, dict[int, float]] = {}
    histories: dict[str, list[dict]] = {}
    done.stage = "the base evaluation"
    reports["base"], difficulty["base"] = evaluate_student(ws, "base")
    done.kept += ["eval/base_*", "base/student"]
    for name, rewrite in (("OPD", False), ("CaOPD", True)):
        done.stage = f"{name} distillation"
        run_cfg = copy.deepcopy(cfg)
        run_cfg.calibration.rewrite = rewrite
        histories[name] = distill_from_warm_start(ws, run_cfg, name, at_step_end=guard.raise_if_stopping)
        done.kept.append(f"{name.lower()}/{TRAIN_LOG}")
        done.stage = f"the {name} evaluation"
        reports[name], difficulty[name] = evaluate_student(ws, name)
        done.kept += [f"eval/{name.lower()}_*", f"{name.lower()}/student"]

    summary = {name: r.to_dict() for name, r in reports.items()}
    summary["accuracy_by_digits"] = difficulty
    if is_main_rank():
        (s.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
        plot_reliability(reports, str(s.run_dir / "reliability.png"),
                         title=f"Embedded default: digit-sum, {len(held_out)} held-out questions")
        if cfg.distill.diagnostics:
            plot_diagnostics(histories, str(s.run_dir / "diagnostics.png"),
                             title="Distillation diagnostics: answer vs confidence tokens")
        table = format_table(reports)
        print("\n" + table)
        print("\naccuracy by number of digits: " + "; ".join(
            f"{k}: " + " ".join(f"{n}={a:.2f}" for n, a in v.items()) for k, v in difficulty.items()))
        print(f"\nreliability diagram: {s.run_dir / 'reliability.png'}\nsummary: {s.run_dir / SUMMARY}")
    return summary
