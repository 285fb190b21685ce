"""The teacher: an EMA of the student (the paper's default), a frozen copy of it, or a separate model.

Design decisions:
- The teacher always has the student's tensor/pipeline layout, so the EMA update is a local, shard-by-shard
  ``lerp_`` on every rank: no communication, no gathered weights.
- ``frozen`` and ``ema`` start as an exact copy of the student (same shards); ``separate`` loads another
  checkpoint, possibly of another size, and must share the tokenizer: its real vocabulary must equal the
  student's, and a different padded size is an error unless ``teacher.use_shared_vocab`` says to compare
  only the shared real vocabulary (the loss ignores padded rows either way).
- The teacher never receives gradients: its parameters have ``requires_grad=False`` and it runs in eval mode.
"""
from __future__ import annotations

import torch

from caopd_megatron.config.schema import TeacherConfig
from caopd_megatron.models.builder import VocabInfo


class VocabMismatchError(ValueError):
    """Student and teacher vocabularies differ in a way the config does not allow."""


def check_vocab_compatible(student: VocabInfo, teacher: VocabInfo, cfg: TeacherConfig) -> None:
    if student.real != teacher.real:
        raise VocabMismatchError(
            f"teacher and student must share the tokenizer: real vocabulary sizes differ "
            f"(student {student.real}, teacher {teacher.real})")
    if student.padded != teacher.padded and not cfg.use_shared_vocab:
        raise VocabMismatchError(
            f"padded vocabulary sizes differ (student {student.padded}, teacher {teacher.padded}); "
            f"set teacher.use_shared_vocab=true to distill over the shared real vocabulary ({student.real} tokens)")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy ``src``'s parameters into ``dst`` (same architecture and layout), tensor by tensor."""
    for (name, d), (_, s) in zip(dst.named_parameters(), src.named_parameters(), strict=True):
        if d.shape != s.shape:
            raise ValueError(f"cannot copy {name}: shapes {tuple(s.shape)} and {tuple(d.shape)} differ")
        d.copy_(s)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, rate: float) -> None:
    """teacher <- (1 - rate) * teacher + rate * student, on this rank's shards (TP/PP-local, no communication)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"teacher.ema_rate must be in [0, 1], got {rate}")
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("EMA teacher and student have different architectures")
    torch._foreach_lerp_(t_params, s_params, rate)
