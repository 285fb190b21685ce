"""``caopd compare``: load two or more models, answer one prompt set greedily, and write the comparison report.

Design decisions:
- A model is named ``NAME=PATH`` (or just ``PATH``, named after its folder) and PATH is recognised by its
  contents: a run directory (``checkpoints/``, its latest complete checkpoint) or one ``step_*`` checkpoint
  (its run's ``config.yaml`` gives the architecture, the run's ``tokenizer/`` the vocabulary); a Megatron
  checkpoint directory (``caopd_checkpoint.json``, as ``tools/import_hf.py`` writes); or a Hugging Face
  folder (``config.json``), imported through ``checkpointing.hf.import_hf_checkpoint`` into the output
  folder first. So an OPD model trained elsewhere compares with one trained here.
- Every model answers the same prompts with the same templates, marker and generation settings (the compare
  config's ``data``, ``calibration`` and ``evaluation`` sections), greedily through ``evaluate_model``, the
  batched generation path of ``caopd evaluate``; each model keeps its own tokenizer and architecture. Models
  are loaded one at a time and released after answering.
- Without ``-c``, the config defaults to the first run directory's ``config.yaml`` so its templates apply.
- Per-prompt rows (text, grade, confidence and its parse status, task, meta) are written per model next
  to the report, so any number in it can be recomputed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from caopd_megatron.data.confidence import parse_confidence_detail
from caopd_megatron.checkpointing import checkpoint as ckpt
from caopd_megatron.checkpointing.hf import import_hf_checkpoint, load_megatron_checkpoint, load_model_config
from caopd_megatron.config.loader import load_config
from caopd_megatron.config.schema import CaOPDConfig, ModelConfig
from caopd_megatron.data.prompts import PromptRecord, load_prompts
from caopd_megatron.data.tokenizer import TextTokenizer
from caopd_megatron.evaluation.compare import ComparisonStats, compare_models
from caopd_megatron.evaluation.evaluate import evaluate_model
from caopd_megatron.evaluation.report import write_report
from caopd_megatron.models.builder import build_gpt_model, resolve_vocab
from caopd_megatron.pipeline.session import Session, eval_prompts, open_session
from caopd_megatron.runtime.distributed import is_main_rank

log = logging.getLogger(__name__)

__all__ = ["CompareError", "ModelSource", "default_config_files", "parse_model_specs", "run_compare"]

RUN, MEGATRON, HF = "run", "megatron", "hf"


class CompareError(ValueError):
    """A ``caopd compare`` input the user can fix (bad model spec, unrecognised folder, too few models)."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    kind: str  # run | megatron | hf


def _kind(path: Path) -> str:
    if (path / ckpt.CHECKPOINTS_DIR).is_dir() or (path / ckpt.META_FILE).is_file():
        return RUN
    if (path / "caopd_checkpoint.json").is_file():
        return MEGATRON
    if (path / "config.json").is_file():
        return HF
    raise CompareError(f"{path}: not a run directory (checkpoints/), a training checkpoint (meta.json), a Megatron "
                       "checkpoint (caopd_checkpoint.json) or a Hugging Face folder (config.json)")


def parse_model_specs(specs: Sequence[str]) -> list[ModelSource]:
    """``NAME=PATH`` or ``PATH`` entries -> model sources; names must be unique, at least two models."""
    sources: list[ModelSource] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise CompareError(f"model {spec!r}: expected NAME=PATH")
        p = Path(path)
        if not p.is_dir():
            raise CompareError(f"model {name}: {p} is not a directory")
        sources.append(ModelSource(name, p, _kind(p)))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise CompareError(f"model names must be unique, got {names}")
    if len(sources) < 2:
        raise CompareError(f"compare needs at least two models, got {len(sources)}")
    return sources


def _run_dir(src: ModelSource) -> Path:
    """The run directory of a run or of one of its step checkpoints (run/checkpoints/step_*)."""
    return src.path if (src.path / ckpt.CHECKPOINTS_DIR).is_dir() else src.path.parent.parent


def default_config_files(specs: Sequence[str]) -> list[str]:
    """The first run directory's ``config.yaml``, when a model is a run with one; else no file."""
    for src in parse_model_specs(specs):
        if src.kind == RUN and (_run_dir(src) / "config.yaml").is_file():
            return [str(_run_dir(src) / "config.yaml")]
    return []


def _load(src: ModelSource, s: Session, work_dir: Path) -> tuple[torch.nn.Module, TextTokenizer, int]:
    """Build and load one model; returns (model, its tokenizer, its real vocabulary size)."""
    path = src.path
    if src.kind == HF:
        path = work_dir / "imported" / src.name
        import_hf_checkpoint(src.path, path, show_progress=False, overwrite=True)
    if src.kind == RUN:
        run_dir = _run_dir(src)
        model_cfg: ModelConfig = load_config([run_dir / "config.yaml"]).model
        tokenizer = TextTokenizer.from_file(run_dir / "tokenizer")
    else:
        model_cfg = load_model_config(path)
        if model_cfg.tokenizer is None:
            raise CompareError(f"model {src.name}: {path} has no tokenizer/ folder")
        tokenizer = TextTokenizer.from_file(model_cfg.tokenizer)
    vocab = resolve_vocab(model_cfg, tokenizer.vocab_size, s.cfg.parallel.tensor_model_parallel_size)
    model = build_gpt_model(model_cfg, s.cfg.parallel, vocab, s.backend, s.groups)
    if src.kind == RUN:
        ckpt.load_checkpoint(src.path, student=model, restore_rng=False, pg_collection=s.groups)
    else:
        load_megatron_checkpoint(path, model)
    model.eval()
    return model, tokenizer, vocab.real


def _prompts(s: Session, prompts_path: str | None) -> list[PromptRecord]:
    if prompts_path is None:
        return eval_prompts(s)
    records, report = load_prompts(prompts_path, on_error=s.cfg.data.on_bad_row)
    if report.n_skipped:
        log.warning("%s: skipped %d bad rows: %s", prompts_path, report.n_skipped, report.errors[:3])
    return records


def run_compare(cfg: CaOPDConfig, specs: Sequence[str], out_dir: str | Path, prompts_path: str | None = None,
                title: str = "Model comparison") -> tuple[ComparisonStats, Path]:
    """Answer ``prompts_path`` (default: the config's eval prompts) with every model; write the report."""
    sources = parse_model_specs(specs)
    out = Path(out_dir)
    s = open_session(cfg, out)
    prompts = _prompts(s, prompts_path)
    rows_by_model: dict[str, list[dict]] = {}
    for src in sources:
        log.info("compare: %s (%s) from %s", src.name, src.kind, src.path)
        model, tokenizer, real_vocab = _load(src, s, out)
        with torch.no_grad():
            _, rows = evaluate_model(model, prompts, tokenizer, cfg, real_vocab, desc=f"answer {src.name}")
        rows_by_model[src.name] = [
            {"prompt_id": r.prompt_id, "task": rec.task, "meta": r.meta, "text": r.text, "correct": r.correct,
             "confidence": r.confidence, "confidence_status": parse_confidence_detail(r.text, cfg.calibration.marker).status}
            for rec, r in zip(prompts, rows)
        ]
        del model
    ev = cfg.evaluation
    stats = compare_models({m: ([r["correct"] for r in rows], [r["confidence"] for r in rows])
                            for m, rows in rows_by_model.items()},
                           n_bins=ev.n_bins, edge_rule=ev.ece_edge_rule, samples=ev.bootstrap_samples,
                           seed=ev.bootstrap_seed, level=ev.confidence_level, thresholds=ev.thresholds)
    md = out / "report.md"
    if is_main_rank():
        for name, rows in rows_by_model.items():
            with open(out / f"responses_{name}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        md = write_report(stats, rows_by_model, out, title=title, sources={s_.name: str(s_.path) for s_ in sources})
    return stats, md


def cmd_compare(cfg: CaOPDConfig, args) -> None:
    """The ``caopd compare`` subcommand: ``--model`` (repeatable), ``--prompts``, ``--out``, ``--title``."""
    stats, md = run_compare(cfg, args.model, args.out, args.prompts, title=args.title)
    log.info("compare: %d models on %d prompts -> %s", len(stats.names), stats.n, md)
    if is_main_rank():
        print(f"report: {md}")
