"""rollout.prefix_source=teacher: the responses are the teacher's own samples from its privileged prompt.

Reference: the teacher's own ``generate`` call on the privileged prompt ids with the same keyed seed
(``rollout.seed + step``); student and teacher have different weights, so the student's samples differ.
"""
from __future__ import annotations

import dataclasses

from caopd_megatron.calibration.revise import revise, student_prompt_text, teacher_prompt_text
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.tasks.digit_sum import make_digit_sum_records
from caopd_megatron.data.tokenizer import build_synthetic_tokenizer
from caopd_megatron.rollout.engine import prefix_rollout
from caopd_megatron.rollout.sampler import SamplingParams, generate
from helpers_models import runtime, tiny_model  # noqa: F401  (runtime is a fixture)


def test_teacher_prefixes_are_the_teachers_own_samples(runtime):
    tok = build_synthetic_tokenizer()
    student, vocab = tiny_model(seed=1, real_vocab=tok.vocab_size)
    teacher, _ = tiny_model(seed=2, real_vocab=tok.vocab_size)
    cfg = CaOPDConfig()
    cfg.rollout = dataclasses.replace(cfg.rollout, samples_per_prompt=3, max_new_tokens=5, prefix_source="teacher")
    prompts = make_digit_sum_records(4, seed=0)
    step = 2
    rolls = prefix_rollout(student, teacher, prompts, tok, cfg, vocab.real, step=step)

    privileged = [tok.encode(teacher_prompt_text(p, cfg.data, cfg.calibration, None)) for p in prompts]
    params = SamplingParams(max_new_tokens=5, temperature=cfg.rollout.temperature, seed=cfg.rollout.seed + step)
    own = generate(teacher, [ids for ids in privileged for _ in range(3)], params, eos_id=tok.eos_id,
                   real_vocab_size=vocab.real)
    assert [r.response_ids for r in rolls] == [g.response_ids for g in own]
    assert [r.logprobs for r in rolls] == [g.logprobs for g in own]
    # The records carry the student's prompt, so grading, rewrite and distillation run unchanged.
    assert all(r.prompt_ids == tok.encode(student_prompt_text(prompts[i // 3], cfg.data)) for i, r in enumerate(rolls))
    examples = revise(rolls, {p.id: p for p in prompts}, tok, cfg.data, cfg.calibration)
    assert len(examples) == 12 and examples[0].student_prompt_ids == rolls[0].prompt_ids

    on_policy = dataclasses.replace(cfg.rollout, prefix_source="student")
    student_rolls = prefix_rollout(student, teacher, prompts, tok, dataclasses.replace(cfg, rollout=on_policy),
                                   vocab.real, step=step)
    assert [r.response_ids for r in student_rolls] != [r.response_ids for r in rolls]
