"""Supervised warm-up of the embedded default: make a random tiny model a usable CaOPD student and teacher.

A pretrained LLM already answers, states a confidence when asked, and follows a privileged context. A
random-init model does none of that, so the embedded default first teaches it, with two kinds of rows:
- plain rows (student template): question -> correct answer, ``Confidence: 1.0``. The model learns the task
  as far as its capacity allows (easy questions well, hard ones poorly) and learns to always claim
  certainty: the over-confident starting point that self-distillation inherits.
- teacher rows (teacher template): demonstration ``a Confidence: c`` (+ optional note ``Note: c``) ->
  response ``a Confidence: c``. The model learns to copy the demonstration's answer and its confidence.

Design decisions (each one mattered in the prototype; see README "What we learned"):
- Teacher rows' demonstrations carry a wrong answer ``wrong_demo_fraction`` of the time, so the teacher's
  confidence follows the note/demonstration, not whether it can verify the answer.
- The confidence target of teacher rows is soft (a Gaussian over the confidence tokens, ``soft_target_sigma``
  steps wide): with one-hot copying, reverse KL later pushed greedy outputs off the confidence tokens.
- Each warm-up step is ``distill.step.supervised_step``, the training step of every layout (soft cross
  entropy on vocabulary shards, micro-batches through megatron's schedule).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from caopd_megatron.data.confidence import format_confidence
from caopd_megatron.calibration.revise import student_prompt_text, templates
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.data.templates import render_teacher
from caopd_megatron.data.tokenizer import CONFIDENCE_TOKENS
from caopd_megatron.distill.optim import build_optimizer, build_scheduler
from caopd_megatron.distill.sft import SupervisedRows, one_hot_shard
from caopd_megatron.distill.step import supervised_step
from caopd_megatron.runtime.progress import close_bar, progress

log = logging.getLogger(__name__)


@dataclass
class WarmupRow:
    prompt: list[int]
    response: list[int]
    soft_conf_at: int  # index into response of the confidence token with a soft target; -1 = none
    conf_index: int  # which confidence value (0..10) the soft target centres on


class WarmupData:
    """Draws warm-up rows from the train records (deterministic for a seed)."""

    def __init__(self, records: list[PromptRecord], tokenizer, cfg: CaOPDConfig, seed: int) -> None:
        self.records, self.tok, self.cfg = records, tokenizer, cfg
        self.rng = random.Random(seed)
        self.marker = cfg.calibration.marker
        self.conf_ids = [tokenizer.token_to_id(t) for t in CONFIDENCE_TOKENS]
        if any(i is None for i in self.conf_ids):
            raise ValueError("the warm-up needs a tokenizer with the confidence tokens 0.0 .. 1.0")

    def _response(self, answer: str, conf_index: int) -> tuple[list[int], int]:
        text = f"{answer} {self.marker} {CONFIDENCE_TOKENS[conf_index]}"
        ids = self.tok.encode(text) + [self.tok.eos_id]
        return ids, ids.index(self.conf_ids[conf_index])

    def row(self) -> WarmupRow:
        if self.rng.random() >= self.cfg.warmup.teacher_format_fraction:
            rec = self.rng.choice(self.records)
            prompt = student_prompt_text(rec, self.cfg.data)
            resp, _ = self._response(rec.reference, len(CONFIDENCE_TOKENS) - 1)
            return WarmupRow(self.tok.encode(prompt), resp, -1, 10)
        return self.teacher_row()

    def teacher_row(self) -> WarmupRow:
        w, rec = self.cfg.warmup, self.rng.choice(self.records)
        answer = rec.reference
        if self.rng.random() < w.wrong_demo_fraction:
            answer = self.rng.choice([d for d in "0123456789" if d != rec.reference])
        k = self.rng.randrange(len(CONFIDENCE_TOKENS))
        conf = CONFIDENCE_TOKENS[k]
        note = ""
        if self.rng.random() < w.note_fraction and self.cfg.calibration.note_template:
            note = self.cfg.calibration.note_template.format(confidence=format_confidence(k / 10, 1))
        prompt = render_teacher(templates(self.cfg.data), rec, demonstration=f"{answer} {self.marker} {conf}", note=note)
        resp, at = self._response(answer, k)
        return WarmupRow(self.tok.encode(prompt), resp, at, k)

    def fork(self) -> "WarmupData":
        """A row source that draws, from here on, exactly the rows this one would (an independent copy)."""
        twin = copy.copy(self)
        twin.rng = random.Random()
        twin.rng.setstate(self.rng.getstate())
        return twin

    def batch(self, n: int) -> list[WarmupRow]:
        return [self.row() for _ in range(n)]


def soft_targets(rows: list[WarmupRow], conf_ids: list[int], sigma: float, targets: torch.Tensor,
                 shard: tuple[int, int]) -> torch.Tensor:
    """Target distribution ``[b, R, V/tp]`` on this rank's vocabulary shard: one-hot, except a Gaussian over
    the confidence tokens at each teacher row's confidence position."""
    lo, hi = shard
    t = one_hot_shard(targets, shard)
    ks = torch.arange(len(conf_ids), dtype=torch.float32)
    for i, r in enumerate(rows):
        if r.soft_conf_at < 0:
            continue
        w = torch.exp(-0.5 * ((ks - r.conf_index) / max(sigma, 1e-6)) ** 2)
        w = w / w.sum()
        t[i, r.soft_conf_at] = 0.0
        for k, tok in enumerate(conf_ids):
            if lo <= tok < hi:
                t[i, r.soft_conf_at, tok - lo] = w[k]
    return t


def supervised_rows(rows: list[WarmupRow], data: WarmupData, pad_id: int) -> SupervisedRows:
    """Warm-up rows as ``SupervisedRows`` with their soft confidence targets (any subset, any vocab shard)."""
    sigma = data.cfg.warmup.soft_target_sigma

    def targets(idx: range, batch, shard: tuple[int, int]) -> torch.Tensor:
        return soft_targets([rows[i] for i in idx], data.conf_ids, sigma, batch.targets, shard)

    return SupervisedRows([r.prompt for r in rows], [r.response for r in rows], pad_id, targets)


def warmup_replay(data: WarmupData, real_vocab_size: int, pad_id: int):
    """A ``ReplaySource`` of fresh teacher-format warm-up rows (neutral between OPD and CaOPD)."""
    def rows(student, examples, n: int) -> SupervisedRows:
        return supervised_rows([data.teacher_row() for _ in range(n)], data, pad_id)
    return rows


def run_warmup(model, data: WarmupData, cfg: CaOPDConfig, real_vocab_size: int, pad_id: int,
               at_step_end: Callable[[], None] | None = None) -> list[float]:
    """Train ``model`` in place for ``cfg.warmup.steps`` steps; returns the loss per step. ``at_step_end`` runs
    after every step (the demo's stop check, which may raise)."""
    w = cfg.warmup
    opt = build_optimizer(model, cfg.optim, lr=w.lr)
    warmup_steps = min(50, w.steps // 10) if w.warmup_steps is None else w.warmup_steps
    sched_cfg = dataclasses.replace(cfg.optim, min_lr=w.lr * w.min_lr_ratio, warmup_steps=warmup_steps)
    sched = build_scheduler(opt, sched_cfg, w.steps)
    losses: list[float] = []
    model.train()
    bar = progress(range(w.steps), desc="warm-up (SFT)", unit="step")
    try:
        for step in bar:
            rows = supervised_rows(data.batch(w.batch_size), data, pad_id)
            # The training step of every layout: micro-batches through megatron's schedule, split over DP ranks.
            losses.append(supervised_step(model, opt, sched, rows, real_vocab_size, cfg.distill.micro_batch_size,
                                          w.grad_clip))
            if hasattr(bar, "set_postfix") and step % 10 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if math.isnan(losses[-1]):
                raise FloatingPointError(f"warm-up loss became NaN at step {step}")
            if at_step_end is not None:
                at_step_end()
    finally:  # a stop raised by at_step_end: take the bar off the terminal before the message
        close_bar(bar)
    log.info("warm-up done: %d steps, final loss %.4f", w.steps, sum(losses[-20:]) / max(1, len(losses[-20:])))
    return losses
