"""The warm-up's gradient clip and learning-rate schedule come from ``warmup.*`` config keys.

Reference: the learning rates are computed by hand in this file (linear warm-up, then a cosine from ``lr``
down to ``lr * min_lr_ratio``), and the clipped gradient norm is measured directly on the parameters'
``.grad`` with ``torch.linalg.vector_norm`` after each optimizer step; the defaults are today's former
hard-coded values (clip 1.0, floor lr * 0.1, min(50, steps // 10) warm-up steps).
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_models import runtime, tiny_model  # noqa: F401  (runtime is a fixture)

from caopd_megatron.config.loader import load_config
from caopd_megatron.config.schema import WarmupConfig
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records
from caopd_megatron.data.tokenizer import build_synthetic_tokenizer
from caopd_megatron.distill import step as training_step
from caopd_megatron.pipeline import warmup


def test_defaults_are_the_former_hard_coded_values():
    w = WarmupConfig()
    assert w.grad_clip == 1.0 and w.min_lr_ratio == 0.1 and w.warmup_steps is None


def hand_lrs(lr: float, steps: int, warmup_steps: int, min_lr_ratio: float) -> list[float]:
    out = []
    for step in range(steps):
        if step < warmup_steps:
            out.append(lr * (step + 1) / warmup_steps)
        else:
            progress = (step - warmup_steps) / (steps - warmup_steps)
            out.append(lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))))
    return out


def run_recorded(monkeypatch, overrides: list[str]) -> list[tuple[float, float, float, float]]:
    """Run a tiny warm-up; per optimizer step (clip asked for, norm before, norm after the clip, lr used)."""
    cfg = load_config(overrides=["warmup.batch_size=4", "warmup.lr=0.01", *overrides])
    tok = build_synthetic_tokenizer()
    model, vocab = tiny_model(seed=1, real_vocab=tok.vocab_size)
    data = warmup.WarmupData(make_digit_sum_records(16, seed=0), tok, cfg, seed=0)
    seen = []
    real_step = training_step.optimizer_step  # the warm-up runs the one training step

    def recording_step(model_, optimizer, scheduler, max_norm):
        norm, lr = real_step(model_, optimizer, scheduler, max_norm)
        grads = [p.grad for p in model_.parameters() if p.grad is not None]
        after = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        seen.append((max_norm, norm, after, lr))
        return norm, lr

    monkeypatch.setattr(training_step, "optimizer_step", recording_step)
    warmup.run_warmup(model, data, cfg, vocab.real, tok.pad_id)
    return seen


def test_clip_and_schedule_are_config_keys(runtime, monkeypatch):  # noqa: F811
    seen = run_recorded(monkeypatch, ["warmup.steps=6", "warmup.grad_clip=0.05", "warmup.min_lr_ratio=0.5",
                                      "warmup.warmup_steps=2"])
    assert [s[3] for s in seen] == pytest.approx(hand_lrs(0.01, 6, 2, 0.5), rel=1e-12)
    assert all(clip == 0.05 for clip, *_ in seen)
    assert all(before > 0.05 for _, before, _, _ in seen)  # the clip is active on every step
    assert [after for _, _, after, _ in seen] == pytest.approx([0.05] * 6, rel=1e-4)


def test_default_schedule_and_no_clip(runtime, monkeypatch):  # noqa: F811
    # warmup_steps unset: min(50, 20 // 10) = 2 linear steps; the floor is lr * 0.1
    seen = run_recorded(monkeypatch, ["warmup.steps=20", "warmup.grad_clip=0"])
    assert [s[3] for s in seen] == pytest.approx(hand_lrs(0.01, 20, 2, 0.1), rel=1e-12)
    # clip 0 leaves the gradients as they are
    assert [after for _, _, after, _ in seen] == pytest.approx([before for _, before, _, _ in seen], rel=1e-5)
