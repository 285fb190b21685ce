"""Checks ``models/teacher.py``: the EMA update, vocabulary compatibility and weight copying.

References: ``ema_update`` is compared with the hand formula ``(1 - rate) * teacher + rate * student``
computed with plain tensor ops on snapshots of random weights (plain modules and a tiny megatron GPTModel);
the vocabulary checks and copy errors are checked against the documented rules and messages.
"""
from __future__ import annotations

import pytest
import torch

from caopd_megatron.config.schema import TeacherConfig
from caopd_megatron.models.builder import VocabInfo
from caopd_megatron.models.teacher import (
    VocabMismatchError,
    check_vocab_compatible,
    copy_weights,
    ema_update,
    freeze,
)


def pair(seed: int = 0):
    torch.manual_seed(seed)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))  # noqa: E731
    return make(), make()


def snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("rate", [0.0, 1.0, 0.01, 0.37])
def test_ema_update_matches_hand_formula(rate):
    teacher, student = pair()
    t0, s0 = snapshot(teacher), snapshot(student)
    assert not all(torch.equal(a, b) for a, b in zip(t0, s0))
    ema_update(teacher, student, rate)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        expected = (1.0 - rate) * a + rate * b
        torch.testing.assert_close(t.detach(), expected, rtol=0, atol=1e-7)
    for s, b in zip(student.parameters(), s0):
        assert torch.equal(s.detach(), b)  # the student is not touched
    if rate == 0.0:
        assert all(torch.equal(t, a) for t, a in zip(teacher.parameters(), t0))
    if rate == 1.0:
        assert all(torch.equal(t, b) for t, b in zip(teacher.parameters(), s0))


def test_repeated_ema_updates_compound():
    teacher, student = pair(1)
    t0, s0 = snapshot(teacher), snapshot(student)
    for _ in range(3):
        ema_update(teacher, student, 0.1)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        # after n steps towards a fixed student: t_n = s + 0.9^n (t_0 - s)
        torch.testing.assert_close(t.detach(), b + 0.9 ** 3 * (a - b), rtol=0, atol=1e-6)


def test_ema_update_on_frozen_megatron_teacher():
    from helpers_models import tiny_model

    student, _ = tiny_model(seed=1)
    teacher, _ = tiny_model(seed=2)
    freeze(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    t0, s0 = snapshot(teacher), snapshot(student)
    ema_update(teacher, student, 0.01)
    n_changed = 0
    for (name, t), a, b in zip(teacher.named_parameters(), t0, s0):
        torch.testing.assert_close(t.detach(), 0.99 * a + 0.01 * b, rtol=0, atol=1e-7, msg=name)
        n_changed += not torch.equal(t, a)
        assert not t.requires_grad
    assert n_changed > 0


@pytest.mark.parametrize("rate", [-0.01, 1.01])
def test_ema_rate_out_of_range(rate):
    teacher, student = pair()
    t0 = snapshot(teacher)
    with pytest.raises(ValueError, match="ema_rate"):
        ema_update(teacher, student, rate)
    assert all(torch.equal(t, a) for t, a in zip(teacher.parameters(), t0))


def test_ema_architecture_mismatch():
    teacher = torch.nn.Linear(3, 3)
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="different architectures"):
        ema_update(teacher, student, 0.5)


# ---------------------------------------------------------------- check_vocab_compatible
def test_vocab_identical_ok():
    check_vocab_compatible(VocabInfo(40, 128), VocabInfo(40, 128), TeacherConfig())


def test_vocab_real_size_mismatch_always_fails():
    for shared in (False, True):
        with pytest.raises(VocabMismatchError) as info:
            check_vocab_compatible(VocabInfo(40, 128), VocabInfo(41, 128), TeacherConfig(use_shared_vocab=shared))
        msg = str(info.value)
        assert "student 40" in msg and "teacher 41" in msg and "tokenizer" in msg


def test_vocab_padded_mismatch_needs_use_shared_vocab():
    student, teacher = VocabInfo(40, 128), VocabInfo(40, 256)
    with pytest.raises(VocabMismatchError) as info:
        check_vocab_compatible(student, teacher, TeacherConfig())
    msg = str(info.value)
    assert "student 128" in msg and "teacher 256" in msg and "teacher.use_shared_vocab=true" in msg
    assert "40 tokens" in msg
    check_vocab_compatible(student, teacher, TeacherConfig(use_shared_vocab=True))  # allowed
    assert issubclass(VocabMismatchError, ValueError)


# ---------------------------------------------------------------- copy_weights
def test_copy_weights_copies_values_not_storage():
    dst, src = pair(3)
    copy_weights(dst, src)
    for d, s in zip(dst.parameters(), src.parameters()):
        assert torch.equal(d, s) and d.data_ptr() != s.data_ptr()
    with torch.no_grad():
        next(src.parameters()).add_(1.0)
    assert not torch.equal(next(dst.parameters()), next(src.parameters()))


def test_copy_weights_shape_error_names_parameter_and_shapes():
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3))
    src = torch.nn.Sequential(torch.nn.Linear(5, 3))
    before = dst[0].weight.detach().clone()
    with pytest.raises(ValueError) as info:
        copy_weights(dst, src)
    assert str(info.value) == "cannot copy 0.weight: shapes (3, 5) and (3, 4) differ"
    assert torch.equal(dst[0].weight, before)


def test_copy_weights_parameter_count_mismatch():
    with pytest.raises(ValueError):
        copy_weights(torch.nn.Linear(3, 3), torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)))
