"""The CLI's phase handlers: each opens a session, does one phase, and leaves its output on disk.

Design decisions:
- The student's current weights come from the latest checkpoint in ``run.output_dir/checkpoints`` when
  there is one, else from ``model.checkpoint`` (an imported HF model), else a fresh initialisation (only
  sensible for the synthetic task).
- ``distill`` is one optimizer step per call and saves a checkpoint after it, so a launcher alternating
  rollout / rewrite / distill jobs makes progress that survives any job failing.
- ``run`` ends, once ``distill.steps`` are done, by writing the student to ``run.output_dir/final`` in the
  checkpoint-directory format ``tools/export_hf.py`` reads (written aside, then renamed into place; a rerun
  of the finished job writes it again).
"""
from __future__ import annotations

import json
import logging
import os
from argparse import Namespace

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
from caopd_megatron.pipeline.train import Trainer
from caopd_megatron.rollout.engine import prefix_rollout
from caopd_megatron.runtime.distributed import is_main_rank
from caopd_megatron.runtime.fault_injection import kill_point
from caopd_megatron.runtime.guard import at_step

log = logging.getLogger(__name__)

FINAL_DIR = "final"


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
    from caopd_megatron.pipeline.demo import run_demo

    run_demo(cfg)


def cmd_rollout(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg)
    t = _trainer(s)
    prompts = [t.prompts[i] for i in t.cursor.take(cfg.rollout.prompts_per_step)]
    rows = prefix_rollout(t.student, t.teacher, prompts, s.tokenizer, cfg, s.vocab.real, step=args.step,
                          desc="rollout")
    if is_main_rank():  # every rank generated the same rows; one writes them
        write_records(args.out, rows)
    log.info("wrote %d rollouts of %d prompts to %s", len(rows), len(prompts), args.out)


def cmd_rewrite(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg)
    rows = read_records(args.rollouts, RolloutRecord, vocab_size=s.vocab.real, allow_empty=False)
    prompts = {p.id: p for p in train_prompts(s)}
    examples = revise(rows, prompts, s.tokenizer, cfg.data, cfg.calibration)
    if is_main_rank():
        write_records(args.out, examples)
    acc = sum(e.correct for e in examples) / max(1, len(examples))
    log.info("graded %d responses (accuracy %.3f), rewrite=%s -> %s", len(examples), acc, cfg.calibration.rewrite,
             args.out)


def cmd_distill(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg, existing=cfg.run.existing)
    t = _trainer(s)
    examples = read_records(args.examples, DistillExample, vocab_size=s.vocab.real, allow_empty=False)
    t.cursor.take(cfg.rollout.prompts_per_step)  # the rollout of this step consumed these prompts
    e = t.learn(examples)
    t.write_history()
    _save(s, t)
    if cfg.distill.diagnostics and is_main_rank() and t.log_path.is_file():
        rows = [json.loads(line) for line in t.log_path.read_text().splitlines() if line]
        log.info("diagnostics plot: %s", plot_diagnostics({"run": rows}, str(s.run_dir / "diagnostics.png")))
    log.info("distill step %d: loss %.4f grad norm %.3f lr %.2e", t.step, e.loss, e.grad_norm, e.lr)


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


def cmd_run(cfg: CaOPDConfig, args: Namespace) -> None:
    s = open_session(cfg, existing=cfg.run.existing)
    t = _trainer(s)
    t.truncate_history(t.step)  # the log holds exactly the steps the checkpoint contains (all, without one)
    saved = t.step if ckpt.latest_checkpoint(s.run_dir) is not None else None
    interval = cfg.checkpoint.save_interval
    stop = cfg.distill.steps if not cfg.run.max_steps_per_job else min(cfg.distill.steps,
                                                                       t.step + cfg.run.max_steps_per_job)
    while t.step < stop:
        e = t.train_step()
        if cfg.logging.log_interval and e.step % cfg.logging.log_interval == 0:
            log.info("step %d: loss %.4f acc %.3f stated conf %.3f empirical %.3f", e.step, e.loss, e.accuracy,
                     e.stated_confidence, e.empirical_confidence)
        if interval and t.step % interval == 0:
            t.write_history()
            kill_point("run:log_written")
            _save(s, t)
            saved = t.step
    t.write_history()
    if saved != t.step:  # never the same step twice (a re-save opens a window with no complete copy)
        _save(s, t)
    if cfg.distill.diagnostics and is_main_rank() and t.log_path.is_file():
        rows = [json.loads(line) for line in t.log_path.read_text().splitlines() if line]
        log.info("diagnostics plot: %s", plot_diagnostics({"run": rows}, str(s.run_dir / "diagnostics.png")))
    if t.step >= cfg.distill.steps:
        _write_final(s, t)


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
