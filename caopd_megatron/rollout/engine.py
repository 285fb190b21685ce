"""The rollout phase: K sampled responses per prompt from the student, as ``RolloutRecord``s.

Design decisions:
- Each prompt is repeated K times in one generation call, so the K samples of a prompt share batches and
  the KV-cache prefill work is batched.
- The seed of a rollout is ``rollout.seed + step`` and sample k of the step's j-th prompt has sequence id
  ``j * K + k`` (the key of its sampling noise): any step's samples can be regenerated exactly, by any
  number of data-parallel replicas and with any generation batch size.
"""
from __future__ import annotations

from typing import Sequence

from caopd_megatron.calibration.revise import student_prompt_text
from caopd_megatron.data.records import RolloutRecord
from caopd_megatron.config.schema import CaOPDConfig
from caopd_megatron.data.prompts import PromptRecord
from caopd_megatron.rollout.sampler import SamplingParams, generate


def rollout(model, prompts: Sequence[PromptRecord], tokenizer, cfg: CaOPDConfig, real_vocab_size: int, step: int = 0,
            desc: str | None = None) -> list[RolloutRecord]:
    r = cfg.rollout
    seed = r.seed + step
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                            top_k=r.top_k, seed=seed)
    prompt_ids = [tokenizer.encode(student_prompt_text(p, cfg.data)) for p in prompts]
    flat = [ids for ids in prompt_ids for _ in range(r.samples_per_prompt)]
    gens = generate(model, flat, params, eos_id=tokenizer.eos_id, real_vocab_size=real_vocab_size,
                    batch_size=r.batch_size, desc=desc)
    out = []
    for i, g in enumerate(gens):
        rec = prompts[i // r.samples_per_prompt]
        text = tokenizer.decode([t for t in g.response_ids if t != tokenizer.eos_id])
        out.append(RolloutRecord(prompt_id=rec.id, sample_index=i % r.samples_per_prompt, prompt_ids=g.prompt_ids,
                                 response_ids=g.response_ids, text=text, logprobs=g.logprobs, seed=seed,
                                 finished=g.finished))
    return out
