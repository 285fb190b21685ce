"""One distillation step of a ~1B Llama-style student and its EMA teacher, and rollout decoding, on one GPU.

Design decisions:
- Everything goes through the project's public calls: ``models.builder`` (via ``common.build_model``),
  ``models.teacher`` (``copy_weights``, ``freeze``, ``ema_update``), ``distill.optim`` (``build_optimizer``:
  fp32 master weights for a bf16 student; ``build_scheduler``), ``distill.step.distill_step`` and
  ``rollout.sampler.generate``. A step is ``distill_step`` + ``ema_update``; it is timed for the unfused and
  the fused (``distill.fused``) loss.
- Random initialisation and random token ids: speed does not depend on the weights' values.
- Model FLOPs per step: student forward + backward (3x forward) and teacher forward (1x) over every position
  of every sequence, forward = ``2 * matmul parameters + causal attention`` per token (``common``); MFU divides
  the achieved rate by the card's measured bf16 matmul rate.
- Decoding: ``batch`` prompts of ``prompt_tokens`` random ids, ``new_tokens`` sampled at temperature 1 with
  keyed noise; EOS is -1 so every row decodes all its tokens.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from benchmarks.gpu.common import (Sizes, attention_flops_per_token, build_model, count_matmul_parameters, measure,
                                   start_runtime)
from caopd_megatron.config.schema import DistillConfig, OptimConfig
from caopd_megatron.data.records import DistillExample
from caopd_megatron.distill.optim import build_optimizer, build_scheduler
from caopd_megatron.distill.step import distill_step
from caopd_megatron.models.teacher import copy_weights, ema_update, freeze
from caopd_megatron.rollout.sampler import SamplingParams, generate

log = logging.getLogger(__name__)

EMA_RATE = 0.01


def privileged_tokens(sizes: Sizes) -> int:
    """Length of the teacher's privileged context (prepended to the student's prompt): a quarter of the prompt."""
    return sizes.step_prompt_tokens // 4


def random_examples(sizes: Sizes, real_vocab: int, seed: int) -> list[DistillExample]:
    """``step_sequences`` examples of random ids (pad id 0 never drawn); the teacher's prompt is a privileged
    context followed by the student's prompt, so the EMA teacher's distribution differs from the student's."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, real_vocab, (n,), generator=g).tolist()

    out = []
    for i in range(sizes.step_sequences):
        prompt, response = ids(sizes.step_prompt_tokens), ids(sizes.step_response_tokens)
        out.append(DistillExample(prompt_id=str(i), sample_index=0, student_prompt_ids=prompt,
                                  teacher_prompt_ids=ids(privileged_tokens(sizes)) + prompt, response_ids=response,
                                  correct=True, stated_confidence=None, empirical_confidence=1.0, text=""))
    return out


def forward_flops(sizes: Sizes, vocab_padded: int, seq: int) -> float:
    """Forward FLOPs over ``step_sequences`` sequences of ``seq`` tokens (see ``common``)."""
    model = sizes.model
    per_token = 2.0 * count_matmul_parameters(model, vocab_padded) + attention_flops_per_token(model, seq)
    return sizes.step_sequences * seq * per_token


def step_flops(sizes: Sizes, vocab_padded: int) -> float:
    """Model FLOPs of one distillation step: student 3x forward, teacher 1x forward (see module doc)."""
    student_seq = sizes.step_prompt_tokens + sizes.step_response_tokens
    return (3.0 * forward_flops(sizes, vocab_padded, student_seq)
            + forward_flops(sizes, vocab_padded, student_seq + privileged_tokens(sizes)))


def run_step(sizes: Sizes, matmul_tflops: float, device: torch.device) -> tuple[list[dict], dict]:
    """(one row per loss variant: ms per step, tokens/s, MFU, peak memory; the rollout row of ``run_rollout``)."""
    backend = start_runtime(seed=0)
    student, vocab = build_model(sizes.model, backend)
    teacher, _ = build_model(sizes.model, backend)
    copy_weights(teacher, student)
    freeze(teacher)
    optimizer = build_optimizer(student, OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"), 1000)
    examples = random_examples(sizes, vocab.real, seed=1)
    flops = step_flops(sizes, vocab.padded)
    tokens = sizes.step_sequences * (sizes.step_prompt_tokens + sizes.step_response_tokens)
    rows = []
    base = DistillConfig(micro_batch_size=sizes.step_micro_batch, chunk_size=1024, grad_clip=1.0)
    for fused in (False, True):
        cfg = replace(base, fused=fused)
        last = {}

        def step():
            last["stats"] = distill_step(student, teacher, optimizer, scheduler, examples, cfg, pad_id=0,
                                         real_vocab_size=vocab.real)
            ema_update(teacher, student, EMA_RATE)

        log.info("distillation step (fused=%s): %d sequences x %d tokens", fused, sizes.step_sequences,
                 tokens // sizes.step_sequences)
        m = measure(step, device, sizes.repeats)
        seconds = m.median_ms * 1e-3
        rows.append({"loss": "fused chunked" if fused else "vocab-parallel", "ms": m.median_ms,
                     "tokens_per_s": tokens / seconds,
                     "loss_tokens_per_s": sizes.step_sequences * sizes.step_response_tokens / seconds,
                     "model_tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / matmul_tflops,
                     "peak_bytes": m.peak_bytes, "peak_total_bytes": m.peak_total_bytes,
                     "loss_value": last["stats"].loss,
                     "grad_norm": last["stats"].grad_norm})
    rollout = run_rollout(student, vocab.real, sizes, device)
    del student, teacher, optimizer
    return rows, rollout


def run_rollout(model, real_vocab: int, sizes: Sizes, device: torch.device) -> dict:
    """Decode ``rollout_batch`` x ``rollout_new_tokens`` with the project's sampler."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, real_vocab, (sizes.rollout_prompt_tokens,), generator=g).tolist()
               for _ in range(sizes.rollout_batch)]
    params = SamplingParams(max_new_tokens=sizes.rollout_new_tokens, temperature=1.0, seed=3)
    last = {}

    def decode():
        last["out"] = generate(model, prompts, params, eos_id=-1, real_vocab_size=real_vocab,
                               batch_size=sizes.rollout_batch)

    log.info("rollout: batch %d, %d new tokens", sizes.rollout_batch, sizes.rollout_new_tokens)
    m = measure(decode, device, repeats=1)
    new_tokens = sum(len(gen.response_ids) for gen in last["out"])
    seconds = m.median_ms * 1e-3
    return {"batch": sizes.rollout_batch, "prompt_tokens": sizes.rollout_prompt_tokens,
            "new_tokens": sizes.rollout_new_tokens, "generated": new_tokens, "s": seconds,
            "tokens_per_s": new_tokens / seconds, "ms_per_decode_step": m.median_ms / sizes.rollout_new_tokens,
            "peak_bytes": m.peak_bytes, "peak_total_bytes": m.peak_total_bytes, "engine": "caopd sampler (megatron StaticInferenceContext)"}
