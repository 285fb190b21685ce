"""The step's answer / confidence diagnostics (distill/step_diagnostics.py) against hand computations, and
one distillation step of a tiny model whose logged entropies equal a direct torch.nn.functional computation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from caopd_megatron.config.schema import DistillConfig
from caopd_megatron.distill.batching import gather_positions, pack
from caopd_megatron.distill.step import response_divergence, step_options
from caopd_megatron.distill.step_diagnostics import StepDiagnostics, confidence_token_mask, diagnostic_keys
from caopd_megatron.data.tokenizer import build_synthetic_tokenizer
from caopd_megatron.distill.step_diagnostics import marker_patterns
from caopd_megatron.distill.token_diagnostics import StudentSupport
from helpers_models import runtime, tiny_model  # noqa: F401  (runtime is a fixture)

MARKER = 9


def test_confidence_tokens_are_those_after_the_marker():
    targets = torch.tensor([[5, 6, MARKER, 7, 1], [5, MARKER, 2, 0, 0], [5, 6, 7, 8, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = confidence_token_mask(targets, mask, [(MARKER,)])
    expected = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, expected)
    # A two-token marker (a BPE split), and the earliest of two patterns.
    got = confidence_token_mask(torch.tensor([[3, 4, 5, 9, 6]]), torch.ones(1, 5), [(4, 5), (9,)])
    assert got.tolist() == [[False, False, False, True, True]]


def _support(h_s, h_t, tail):
    empty = torch.zeros(len(h_s), 1)
    return StudentSupport(torch.tensor(h_s), torch.tensor(h_t), torch.tensor(tail), empty, empty)


def test_summary_is_the_token_mean_per_group(runtime):
    model, _ = tiny_model(seed=0)
    diag = StepDiagnostics(((MARKER,),), top_k=2)
    targets = torch.tensor([[5, MARKER, 7, 8]])
    mask = torch.ones(1, 4)
    diag.sink.add(_support([1.0, 2.0, 3.0, 5.0], [0.5, 0.5, 1.0, 2.0], [0.1, 0.2, 0.3, 0.4]),
                  torch.tensor([0.4, 0.6, 1.0, 3.0]), torch.tensor([1.0, -1.0, 2.0, 4.0]))
    diag.absorb(targets, mask)
    out = diag.summary(model)
    assert list(out) == diagnostic_keys()
    expected = dict(answer_student_entropy=1.5, confidence_student_entropy=4.0, answer_teacher_entropy=0.5,
                    confidence_teacher_entropy=1.5, answer_divergence=0.5, confidence_divergence=2.0,
                    answer_teacher_tail=0.15, confidence_teacher_tail=0.35,
                    answer_advantage_sd=1.0, confidence_advantage_sd=1.0)  # population sd of (1, -1), (2, 4)
    for key, value in expected.items():
        assert math.isclose(out[key], value, rel_tol=1e-6), key  # fp32 inputs
    assert all(v is None for v in diag.summary(model).values())  # reset after a summary


def test_response_divergence_diagnostics_match_the_model_logits(runtime):
    tok = build_synthetic_tokenizer()
    student, vocab = tiny_model(seed=3, real_vocab=tok.vocab_size)
    teacher, _ = tiny_model(seed=4, real_vocab=tok.vocab_size)
    prompts = [tok.encode("Q 3 4 ="), tok.encode("Q 5 =")]
    responses = [tok.encode("7 Confidence: 0.5") + [tok.eos_id], tok.encode("5 Confidence: 1.0") + [tok.eos_id]]
    batch = pack(prompts, responses, tok.pad_id)
    from caopd_megatron.distill.schedule import HiddenStateCapture

    for loss in ("reverse_kl", "vopd"):
        cfg = DistillConfig(loss=loss, top_k=3)
        diag = StepDiagnostics(marker_patterns(tok, "Confidence:"), top_k=3)
        with torch.no_grad(), HiddenStateCapture(teacher):
            t_hidden = gather_positions(teacher(batch.tokens, batch.positions, attention_mask=None), batch.index)
        s_logits = gather_positions(student(batch.tokens, batch.positions, attention_mask=None), batch.index)
        response_divergence(s_logits, t_hidden, student, teacher, step_options(student, cfg, vocab.real, diag),
                            batch.targets)
        diag.absorb(batch.targets, batch.mask)
        out = diag.summary(student)
        t_logits = gather_positions(teacher(batch.tokens, batch.positions, attention_mask=None), batch.index)
        logp = F.log_softmax(s_logits[..., :vocab.real].double(), -1)
        logq = F.log_softmax(t_logits[..., :vocab.real].double(), -1)
        h_s, h_t = -(logp.exp() * logp).sum(-1), -(logq.exp() * logq).sum(-1)
        conf = torch.tensor([[False, False, True, True], [False, False, True, True]])  # "0.5" / "1.0", EOS
        answer = ~conf
        assert math.isclose(out["answer_student_entropy"], float(h_s[answer].mean()), rel_tol=1e-5)
        assert math.isclose(out["confidence_student_entropy"], float(h_s[conf].mean()), rel_tol=1e-5)
        assert math.isclose(out["confidence_teacher_entropy"], float(h_t[conf].mean()), rel_tol=1e-5)
        assert (out["answer_advantage_sd"] is None) == (loss != "vopd")
