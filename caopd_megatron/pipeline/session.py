"""Everything a phase needs before it starts: backend, distributed groups, tokenizer, prompts, models.

Design decisions:
- Each CLI phase and the embedded default build their world through ``open_session`` so start-up checks
  (backend, layout, vocab compatibility, config validity) happen once, in one place, with clear errors.
- The session logs which backend and fallbacks are active, and saves the resolved config in the run dir.
- Logging is set up after the process group exists (each rank knows its rank); then rank 0 takes the run
  directory's lock, so a second live job on the same directory stops before it touches anything.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from caopd_megatron.calibration.revise import student_prompt_text, teacher_prompt_text
from caopd_megatron.checkpointing.run_dir import choose_run_dir
from caopd_megatron.config.loader import save_config, to_yaml
from caopd_megatron.config.schema import CaOPDConfig, ModelConfig
from caopd_megatron.data.prompts import PromptRecord, load_prompts
from caopd_megatron.data.row_checks import Render, check_prompt_rows
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records
from caopd_megatron.data.tokenizer import TextTokenizer, build_synthetic_tokenizer
from caopd_megatron.models.builder import VocabInfo, build_gpt_model, count_parameters, resolve_vocab
from caopd_megatron.models.fp8 import teacher_model_config
from caopd_megatron.models.teacher import check_vocab_compatible, copy_weights, freeze
from caopd_megatron.parallel.data_parallel import unwrap, wrap_student
from caopd_megatron.rollout.dynamic import engine_for_this_process
from caopd_megatron.runtime import distributed
from caopd_megatron.runtime.backend import Backend, detect_backend
from caopd_megatron.runtime.progress import record_job, set_progress, setup_logging
from caopd_megatron.runtime.run_lock import acquire_run_lock

log = logging.getLogger(__name__)


@dataclass
class Session:
    cfg: CaOPDConfig
    backend: Backend
    tokenizer: TextTokenizer
    vocab: VocabInfo
    run_dir: Path
    groups: Any  # megatron-core ProcessGroupCollection: built once here, passed to the models


def open_session(cfg: CaOPDConfig, run_dir: str | Path | None = None, parallel: bool = True,
                 existing: str | None = None) -> Session:
    """Start-up checks, process groups (unless ``parallel`` is False: a single-task phase such as ``rewrite``,
    which needs no model and runs under any layout), logging, the run-directory lock, tokenizer.

    ``existing``: what a training job does with a directory that already holds a run (``run.existing``);
    None for phases that only read it (rollout, rewrite, evaluate)."""
    run_dir = Path(run_dir or cfg.run.output_dir)
    env = distributed.read_env()
    setup_logging(cfg.logging.level, None, env.rank)  # console only until the process group exists
    set_progress(cfg.logging.progress)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    backend = detect_backend()
    engine_for_this_process(cfg.rollout.engine)  # logs the rollout engine; dynamic without CUDA stops here
    if parallel:
        # Both models' own numbers first (the teacher shares the student's layout), then the world size.
        distributed.check_layout(None, cfg.parallel, cfg.model.num_layers, cfg.model.num_attention_heads,
                                 cfg.model.num_query_groups)
        if cfg.teacher.mode == "separate" and cfg.teacher.model is not None:
            t = cfg.teacher.model
            distributed.check_layout(None, cfg.parallel, t.num_layers, t.num_attention_heads, t.num_query_groups,
                                     what="teacher.model")
        distributed.check_layout(env.world_size, cfg.parallel, cfg.model.num_layers,
                                 cfg.model.num_attention_heads, cfg.model.num_query_groups)
        env = distributed.initialize(cfg.parallel, cfg.run.seed)
    groups = distributed.process_groups() if parallel else None
    if existing is not None:  # resume | refuse | a fresh sibling directory (checkpointing/run_dir.py)
        run_dir = choose_run_dir(run_dir, existing)
        cfg = replace(cfg, run=replace(cfg.run, output_dir=str(run_dir)))
    log_file = setup_logging(cfg.logging.level, run_dir, distributed.current_rank())
    if cfg.run.lock:
        acquire_run_lock(run_dir, " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]]))
    log.info("backend: %s", backend.describe())
    if env.rendezvous:
        log.info("rendezvous: %s", env.rendezvous)
    tokenizer = TextTokenizer.from_file(cfg.model.tokenizer) if cfg.model.tokenizer else build_synthetic_tokenizer()
    vocab = resolve_vocab(cfg.model, tokenizer.vocab_size, cfg.parallel.tensor_model_parallel_size)
    if distributed.is_main_rank():
        save_config(cfg, run_dir / "config.yaml")
        record_job(run_dir, to_yaml(cfg))
        tokenizer.save(run_dir / "tokenizer")
        log.info("job log %s; resolved config and launch environment recorded beside it", log_file)
    log.info("tokenizer: %d tokens (padded vocab %d)", vocab.real, vocab.padded)
    return Session(cfg, backend, tokenizer, vocab, run_dir, groups)


def build_student(s: Session):
    """This rank's student stage; wrapped in megatron-core DDP under PP > 1 or DP > 1 (``parallel.data_parallel``),
    for megatron's distributed optimizer when ``parallel.use_distributed_optimizer`` (and DP > 1)."""
    model = build_gpt_model(s.cfg.model, s.cfg.parallel, s.vocab, s.backend, s.groups)
    log.info("student: %s parameters on this rank", f"{count_parameters(model):,}")
    par = s.cfg.parallel
    return wrap_student(model, par.use_distributed_optimizer, par.overlap_grad_reduce, par.ddp_bucket_size)


def build_teacher(s: Session, student) -> torch.nn.Module:
    """Teacher per ``teacher.mode``: a frozen copy of the student's current weights (ema, frozen) or another model."""
    t = s.cfg.teacher
    if t.mode == "separate":
        model_cfg: ModelConfig = t.model or s.cfg.model
        vocab = resolve_vocab(model_cfg, s.tokenizer.vocab_size, s.cfg.parallel.tensor_model_parallel_size)
        check_vocab_compatible(s.vocab, vocab, t)
        teacher = build_gpt_model(teacher_model_config(model_cfg), s.cfg.parallel, vocab, s.backend, s.groups)
        if t.checkpoint:
            from caopd_megatron.checkpointing.hf import load_megatron_checkpoint

            load_megatron_checkpoint(t.checkpoint, teacher)
        else:
            log.warning("teacher.mode=separate without teacher.checkpoint: the teacher is randomly initialised")
        return freeze(teacher)
    teacher = build_gpt_model(teacher_model_config(s.cfg.model), s.cfg.parallel, s.vocab, s.backend, s.groups)
    copy_weights(teacher, unwrap(student))
    return freeze(teacher)


def _checked_rows(s: Session, what: str, source: str, records: list[PromptRecord], loader_skipped: list[str],
                  render: Render, response_tokens: int) -> list[PromptRecord]:
    """Rows that pass ``data/row_checks.py``; the skipped count (loader + checks) is printed for each set."""
    kept, dropped = check_prompt_rows(records, source=source, render=render, encode=s.tokenizer.encode,
                                      context=s.cfg.model.max_position_embeddings, response_tokens=response_tokens,
                                      on_bad_row=s.cfg.data.on_bad_row)
    skipped = loader_skipped + dropped
    if skipped:
        log.warning("%s (%s): %d row(s) used, %d skipped (%d unreadable, %d failing checks); first: %s", what,
                    source, len(kept), len(skipped), len(loader_skipped), len(dropped), skipped[0])
    else:
        log.info("%s (%s): %d row(s), none skipped", what, source, len(kept))
    return kept


def train_prompts(s: Session) -> list[PromptRecord]:
    """Training prompts; each row checked as a student prompt and as the teacher's privileged prompt."""
    cfg = s.cfg
    if cfg.data.train_prompts:
        records, report = load_prompts(cfg.data.train_prompts, on_error=cfg.data.on_bad_row)
        source, loader_skipped = cfg.data.train_prompts, report.errors
    else:
        records = make_digit_sum_records(cfg.task.n_train, cfg.run.seed, cfg.task.min_digits, cfg.task.max_digits,
                                         "train")
        source, loader_skipped = "synthetic task", []
    p = 1.0 if cfg.calibration.rewrite else None  # the longest note a rewrite writes has this many characters

    def render(rec: PromptRecord) -> list[tuple[str, str]]:
        return [("student prompt", student_prompt_text(rec, cfg.data)),
                ("teacher prompt", teacher_prompt_text(rec, cfg.data, cfg.calibration, p))]

    return _checked_rows(s, "train prompts", source, records, loader_skipped, render, cfg.rollout.max_new_tokens + 1)


def eval_prompts(s: Session) -> list[PromptRecord]:
    cfg = s.cfg
    if cfg.data.eval_prompts:
        records, report = load_prompts(cfg.data.eval_prompts, on_error=cfg.data.on_bad_row)
        source, loader_skipped = cfg.data.eval_prompts, report.errors
    else:
        records = make_digit_sum_records(cfg.task.n_eval, cfg.run.seed + 7919, cfg.task.min_digits,
                                         cfg.task.max_digits, "eval")
        source, loader_skipped = "synthetic task", []

    def render(rec: PromptRecord) -> list[tuple[str, str]]:
        return [("student prompt", student_prompt_text(rec, cfg.data))]

    return _checked_rows(s, "eval prompts", source, records, loader_skipped, render, cfg.evaluation.max_new_tokens + 1)
