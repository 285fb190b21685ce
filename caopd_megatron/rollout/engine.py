"""The rollout phase: K sampled responses per prompt, as ``RolloutRecord``s.

Design decisions:
- Each prompt is repeated K times in one generation call, so the K samples of a prompt share batches and
  the KV-cache prefill work is batched.
- The seed of a rollout is ``rollout.seed + step`` and sample k of the step's j-th prompt has sequence id
  ``j * K + k`` (the key of its sampling noise): any step's samples can be regenerated exactly, by any
  number of data-parallel replicas and with any generation batch size.
- ``rollout.engine`` picks the decoding engine (``rollout/dynamic.py``: static, megatron-core's dynamic on
  CUDA, or auto); ``rollout.pipeline_microbatches`` the micro-batches in flight under PP.
- ``rollout.prefix_source`` picks whose samples form the responses (``prefix_rollout``): the student's from
  its own prompt (on-policy, the default) or the teacher's from its privileged prompt (demonstration, no
  note; sequence-level KD). Either way the records carry the *student* prompt ids, so grading, rewrite and
  distillation run unchanged; the ``logprobs`` are then the teacher's.
"""
from __future__ import annotations

from typing import Sequence

from caopd_megatron.calibration.revise import student_prompt_text, teacher_prompt_text
from caopd_megatron.data.records import RolloutRecord
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.rollout.dynamic import engine_for_this_process
from caopd_megatron.rollout.sampler import SamplingParams, generate


def rollout(model, prompts: Sequence[PromptRecord], tokenizer, cfg: CaOPDConfig, real_vocab_size: int, step: int = 0,
            desc: str | None = None, sampling_prompts: Sequence[list[int]] | None = None) -> list[RolloutRecord]:
    """K samples per prompt from ``model``; ``sampling_prompts``: the ids it samples from (default: the student
    prompts). The records always carry the student prompt ids."""
    r = cfg.rollout
    seed = r.seed + step
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, seed=seed)
    prompt_ids = [tokenizer.encode(student_prompt_text(p, cfg.data)) for p in prompts]
    sources = prompt_ids if sampling_prompts is None else sampling_prompts
    flat = [ids for ids in sources for _ in range(r.samples_per_prompt)]
    gens = generate(model, flat, params, eos_id=tokenizer.eos_id, real_vocab_size=real_vocab_size,
                    batch_size=r.batch_size, desc=desc, pipeline_microbatches=r.pipeline_microbatches,
                    engine=engine_for_this_process(r.engine))
    out = []
    for i, g in enumerate(gens):
        rec = prompts[i // r.samples_per_prompt]
        text = tokenizer.decode([t for t in g.response_ids if t != tokenizer.eos_id])
        out.append(RolloutRecord(prompt_id=rec.id, sample_index=i % r.samples_per_prompt,
                                 prompt_ids=list(prompt_ids[i // r.samples_per_prompt]),
                                 response_ids=g.response_ids, text=text, logprobs=g.logprobs, seed=seed,
                                 finished=g.finished))
    return out


def prefix_rollout(student, teacher, prompts: Sequence[PromptRecord], tokenizer, cfg: CaOPDConfig,
                   real_vocab_size: int, step: int = 0, desc: str | None = None) -> list[RolloutRecord]:
    """The step's rollouts from the ``rollout.prefix_source`` model: the student, or the teacher sampling from
    its privileged prompt (the same keyed seed either way)."""
    if cfg.rollout.prefix_source == "student":
        return rollout(student, prompts, tokenizer, cfg, real_vocab_size, step=step, desc=desc)
    privileged = [tokenizer.encode(teacher_prompt_text(p, cfg.data, cfg.calibration, None)) for p in prompts]
    return rollout(teacher, prompts, tokenizer, cfg, real_vocab_size, step=step, desc=desc, sampling_prompts=privileged)
