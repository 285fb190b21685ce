"""distill_step with distill.loss=mixed and vopd (unfused and fused): the parameter gradients of a tiny model
equal a per-example fp64 torch.nn.functional reference (mean over tokens, then sequences), whatever the micro-batching."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caopd_megatron.config.schema import DistillConfig
from caopd_megatron.distill.step import distill_step
from helpers_models import REAL_VOCAB, full_logits, runtime  # noqa: F401  (runtime is a fixture)
from test_batching_and_step import PAD, RecordingSGD, fresh_student, make_examples, teacher  # noqa: F401


def reference(student, teacher, examples, cfg: DistillConfig):
    """(loss value, parameter gradients) of the objective, example by example in fp64."""
    student.zero_grad(set_to_none=True)
    values, surrogates = [], []
    for e in examples:
        m = len(e.response_ids)
        if m == 0:
            continue
        ns, nt = len(e.student_prompt_ids), len(e.teacher_prompt_ids)
        s = full_logits(student, e.student_prompt_ids + e.response_ids)[ns - 1: ns - 1 + m, :REAL_VOCAB]
        with torch.no_grad():
            t = full_logits(teacher, e.teacher_prompt_ids + e.response_ids)[nt - 1: nt - 1 + m, :REAL_VOCAB]
        logp, logq = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
        reverse = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
        if cfg.loss == "mixed":
            forward = F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
            value = cfg.mix_weight * forward + (1 - cfg.mix_weight) * reverse
            surrogate = value
        else:  # vopd, full baseline
            y = torch.tensor(e.response_ids).unsqueeze(-1)
            log_p_y = logp.gather(-1, y).squeeze(-1)
            advantage = (logq.gather(-1, y).squeeze(-1) - log_p_y + reverse).detach()
            value, surrogate = reverse, -advantage * log_p_y
        values.append(value.mean())
        surrogates.append(surrogate.mean())
    torch.stack(surrogates).mean().backward()
    grads = {n: p.grad.detach().double() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    return float(torch.stack(values).mean()), grads


@pytest.mark.parametrize("loss,fused", [("mixed", False), ("vopd", False), ("vopd", True)])
def test_objective_step_matches_the_reference(runtime, teacher, loss, fused):
    examples = make_examples()
    base = DistillConfig(loss=loss, mix_weight=0.3, grad_clip=0.0)
    ref_loss, ref_grads = reference(fresh_student(), teacher, examples, base)
    for micro_batch_size in (8, 3):
        student = fresh_student()
        opt = RecordingSGD(student.parameters(), lr=0.0)
        cfg = DistillConfig(loss=loss, mix_weight=0.3, grad_clip=0.0, micro_batch_size=micro_batch_size, fused=fused,
                            chunk_size=5)
        stats = distill_step(student, teacher, opt, None, examples, cfg, pad_id=PAD, real_vocab_size=REAL_VOCAB)
        assert stats.loss == pytest.approx(ref_loss, rel=1e-5)
        for name, p in student.named_parameters():
            torch.testing.assert_close(opt.seen[id(p)].double(), ref_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{loss} mbs={micro_batch_size} {name}")
