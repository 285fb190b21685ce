"""The CLI's phase handlers: each opens a session, does one phase, and leaves its output on disk.

Design decisions:
- The student's current weights come from the latest checkpoint in ``run.output_dir/checkpoints`` when
  there is one, else from ``model.checkpoint`` (an imported HF model), else a fresh initialisation (only
  sensible for the synthetic task).
- ``distill`` is one optimizer step per call and saves a checkpoint after it, so a launcher alternating
  rollout / rewrite / distill jobs makes progress that survives any job failing.
- The phase loop is driven by the checkpoint, not by the launcher: each phase works on step k = the latest
  checkpoint's step (a given ``--step`` must agree), its files default to ``phases/step_<k>.*.jsonl`` in the
  run directory, and once k reaches ``distill.steps`` a phase does nothing and exits with code 3, so a loop
  resubmitted after a kill resumes where it was and stops by itself. ``rollout`` loads the student's weights
  only; ``rewrite`` builds no model and no process group (one task, whatever the layout); ``distill`` loads
  the full state and appends its step to ``train_log.jsonl``.
- ``run`` checks for a stop request (signal, time budget) at every step boundary, saves once and exits with
  code 75 (``runtime/preemption.py``); it never saves the same step twice, and a finished run exits at once.
- ``run`` ends, once ``distill.steps`` are done, by writing the student to ``run.output_dir/final`` in the
  checkpoint-directory format ``tools/export_hf.py`` reads (written aside, then renamed into place).
"""
from __future__ import annotations

import json
import logging
import os
from argparse import Namespace
from pathlib import Path

from caopd_megatron.calibration.revise import revise
from caopd_megatron.checkpointing import checkpoint as ckpt
from caopd_megatron.checkpointing.agreement import broadcast_from_rank0
from caopd_megatron.checkpointing.atomic import install_directory
from caopd_megatron.checkpointing.hf import load_megatron_checkpoint, save_megatron_checkpoint
from caopd_megatron.config.loader import to_yaml
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.records import DistillExample, RolloutRecord
from caopd_megatron.data.records_io import read_records, write_records
from caopd_megatron.evaluation.diagnostics_plot import plot_diagnostics
from caopd_megatron.evaluation.evaluate import evaluate_model, write_eval
from caopd_megatron.evaluation.reliability import plot_reliability
from caopd_megatron.pipeline.session import Session, build_student, build_teacher, eval_prompts, open_session, train_prompts
from caopd_megatron.pipeline.train import PromptCursor, Trainer
from caopd_megatron.rollout.engine import prefix_rollout
from caopd_megatron.runtime.distributed import is_main_rank
from caopd_megatron.runtime.exit_codes import EXIT_DONE, EXIT_INTERRUPTED, NothingLeftToDo, PhaseOrderError
from caopd_megatron.runtime.fault_injection import kill_point
from caopd_megatron.runtime.preemption import NO_STOP, StopGuard, describe_stop

log = logging.getLogger(__name__)

FINAL_DIR = "final"


def completed_steps(s: Session) -> int:
    """Optimizer steps the run directory's latest checkpoint holds (0 without one). ``run.existing`` has
    already chosen the directory (``open_session``): a ``new`` run starts in an empty one."""
    latest = ckpt.latest_checkpoint(s.run_dir)
    return 0 if latest is None else int(latest.name.removeprefix("step_"))


def next_phase_step(s: Session, phase: str) -> int:
    """The step a phase works on; ``NothingLeftToDo`` once the run is complete."""
    done = completed_steps(s)
    if done >= s.cfg.distill.steps:
        raise NothingLeftToDo(f"the checkpoint in {s.run_dir} is at step {done} and distill.steps={s.cfg.distill.steps}: "
                              f"training is complete, no {phase} to do")
    return done


def phase_file(s: Session, step: int, kind: str, given: str | None) -> Path:
    """``given`` when the user named the file, else ``<run_dir>/phases/step_<k>.<kind>.jsonl``."""
    return Path(given) if given else s.run_dir / "phases" / f"step_{step:06d}.{kind}.jsonl"


def _load_initial(s: Session, student) -> None:
    if s.cfg.model.checkpoint:
        load_megatron_checkpoint(s.cfg.model.checkpoint, student)


def _trainer(s: Session) -> Trainer:
    """Student, teacher, optimizer and data cursor, resumed from the latest checkpoint when there is one."""
    student = build_student(s)
    _load_initial(s, student)
    teacher = build_teacher(s, student)
    trainer = Trainer(s.cfg, student, teacher, s.tokenizer, s.vocab.real, train_prompts(s), s.run_dir)
    latest = ckpt.latest_checkpoint(s.run_dir)
    if latest is not None:
        state = ckpt.load_checkpoint(latest, student=student, optimizer=trainer.optimizer,
                                     scheduler=trainer.scheduler, teacher=teacher,
                                     pg_collection=s.groups)
        trainer.step = state.step
        trainer.cursor.load(state.data_position)
        log.info("resumed from %s (step %d)", latest, state.step)
    return trainer


def _save(s: Session, t: Trainer) -> None:
    ckpt.save_checkpoint(s.run_dir, t.step, student=t.student, optimizer=t.optimizer, scheduler=t.scheduler,
                         teacher=t.teacher, state=ckpt.TrainState(step=t.step, data_position=t.cursor.state()),
                         config_yaml=to_yaml(s.cfg), keep_last=s.cfg.checkpoint.keep_last,
                         distributed=s.cfg.checkpoint.distributed,
                         pg_collection=s.groups)


def cmd_demo(cfg: CaOPDConfig, args: Namespace) -> None:
    """The embedded default; a stop signal ends it with ``StopRequested`` (exit 75, one line)."""
    from caopd_megatron.pipeline.demo import run_demo

    run_demo(cfg)


def cmd_rollout(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg)
    step = next_phase_step(s, "rollout")
    if args.step is not None and args.step != step:
        raise PhaseOrderError(f"--step {args.step}, but the checkpoint in {s.run_dir} is at step {step}: the next "
                              f"rollout is step {step} (omit --step to follow the checkpoint)")
    student = build_student(s)  # weights only: no teacher, no optimizer
    _load_initial(s, student)
    all_prompts = train_prompts(s)
    cursor = PromptCursor(len(all_prompts), cfg.run.seed)
    # Teacher prefixes (rollout.prefix_source=teacher) also need the teacher, as the checkpoint holds it.
    teacher = build_teacher(s, student) if cfg.rollout.prefix_source == "teacher" else None
    if step:
        state = ckpt.load_checkpoint(s.run_dir, student=student, teacher=teacher, pg_collection=s.groups)
        cursor.load(state.data_position)
    prompts = [all_prompts[i] for i in cursor.take(cfg.rollout.prompts_per_step)]
    rows = prefix_rollout(student, teacher, prompts, s.tokenizer, cfg, s.vocab.real, step=step, desc="rollout")
    out = phase_file(s, step, "rollouts", args.out)
    if is_main_rank():  # every rank generated the same rows; one writes them
        write_records(out, rows)
    log.info("step %d: wrote %d rollouts of %d prompts to %s", step, len(rows), len(prompts), out)


def cmd_rewrite(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg, parallel=False)
    step = next_phase_step(s, "rewrite")
    source = phase_file(s, step, "rollouts", args.rollouts)
    rows = read_records(source, RolloutRecord, vocab_size=s.vocab.real, allow_empty=False)
    prompts = {p.id: p for p in train_prompts(s)}
    examples = revise(rows, prompts, s.tokenizer, cfg.data, cfg.calibration)
    out = phase_file(s, step, "revised", args.out)
    if is_main_rank():
        write_records(out, examples)
    acc = sum(e.correct for e in examples) / max(1, len(examples))
    log.info("step %d: graded %d responses (accuracy %.3f), rewrite=%s -> %s", step, len(examples), acc,
             cfg.calibration.rewrite, out)


def cmd_distill(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg, existing=cfg.run.existing)
    step = next_phase_step(s, "distill")
    examples = read_records(phase_file(s, step, "revised", args.examples), DistillExample, vocab_size=s.vocab.real,
                            allow_empty=False)
    t = _trainer(s)
    t.cursor.take(cfg.rollout.prompts_per_step)  # the rollout of this step consumed these prompts
    e = t.learn(examples)
    t.write_history()
    _save(s, t)
    log.info("distill step %d: loss %.4f grad norm %.3f lr %.2e", step, e.loss, e.grad_norm, e.lr)


def cmd_evaluate(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg)
    t = _trainer(s)
    report, rows = evaluate_model(t.student, eval_prompts(s), s.tokenizer, cfg, s.vocab.real)
    path = s.run_dir / "eval" / f"{args.name}_metrics.json"
    if is_main_rank():
        write_eval(s.run_dir / "eval", args.name, report, rows)
        plot_reliability({args.name: report}, str(s.run_dir / "eval" / f"{args.name}_reliability.png"))
    log.info("accuracy %.3f ECE %.3f OCG %+.3f Brier %.3f -> %s", report.accuracy, report.ece, report.ocg,
             report.brier, path)


def cmd_run(cfg: CaOPDConfig, args: Namespace) -> int:
    with StopGuard(cfg.run.stop_signals, cfg.run.max_minutes_per_job) as guard:
        s = open_session(cfg, existing=cfg.run.existing)
        if completed_steps(s) >= cfg.distill.steps:
            log.info("run complete: the checkpoint in %s is at distill.steps=%d; nothing to do", s.run_dir,
                     cfg.distill.steps)
            return EXIT_DONE
        t = _trainer(s)
        t.truncate_history(t.step)  # the log holds exactly the steps the checkpoint contains (all, without one)
        saved = t.step if ckpt.latest_checkpoint(s.run_dir) is not None else None
        interval = cfg.checkpoint.save_interval
        stop = cfg.distill.steps if not cfg.run.max_steps_per_job else min(cfg.distill.steps,
                                                                           t.step + cfg.run.max_steps_per_job)
        reason = NO_STOP
        while t.step < stop:
            e = t.train_step()
            if cfg.logging.log_interval and e.step % cfg.logging.log_interval == 0:
                log.info("step %d: loss %.4f acc %.3f stated conf %.3f empirical %.3f", e.step, e.loss, e.accuracy,
                         e.stated_confidence, e.empirical_confidence)
            reason = guard.agreed_stop()  # step boundary: one collective, every rank gets the same verdict
            if reason != NO_STOP or (interval and t.step % interval == 0):
                t.write_history()
                kill_point("run:log_written")
                _save(s, t)
                saved = t.step
            if reason != NO_STOP:
                break
        t.write_history()
        if saved != t.step:  # never the same step twice (a re-save opens a window with no complete copy)
            _save(s, t)
        if cfg.distill.diagnostics and is_main_rank() and t.log_path.is_file():
            rows = [json.loads(line) for line in t.log_path.read_text().splitlines() if line]
            log.info("diagnostics plot: %s", plot_diagnostics({"run": rows}, str(s.run_dir / "diagnostics.png")))
        if reason != NO_STOP and t.step < cfg.distill.steps:
            log.warning("%s: saved step %d of %d; exiting with code %d (resubmit or requeue to continue)",
                        describe_stop(reason), t.step, cfg.distill.steps, EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        if t.step >= cfg.distill.steps:
            _write_final(s, t)
        return EXIT_DONE


def _write_final(s: Session, t: Trainer) -> None:
    """The trained student as an exportable checkpoint directory, ``run_dir/final``. Collective."""
    final = s.run_dir / FINAL_DIR
    token = broadcast_from_rank0(os.getpid())
    tmp = final.with_name(f"{FINAL_DIR}.tmp-{token}")
    save_megatron_checkpoint(tmp, t.student, s.cfg.model, real_vocab_size=s.vocab.real,
                             tokenizer_dir=s.run_dir / "tokenizer", overwrite=True)
    if is_main_rank():
        install_directory(tmp, final, token)
    log.info("wrote the final student to %s (export: python tools/export_hf.py --ckpt %s --out <hf folder>)",
             final, final)
