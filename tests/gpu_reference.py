"""The scenario of ``tests/test_gpu.py``, and its CPU reference run.

``python tests/gpu_reference.py OUT.pt`` (``tests/test_gpu.py`` starts it with CUDA hidden, so megatron-core
runs on the CPU through the project's shims) builds the tiny fp32 student (seed 0) and teacher (seed 1),
samples with the project's sampler and takes one distillation step (unfused and fused loss), and saves the
initial weights and every result. The GPU test loads those weights into models on CUDA and runs the same
functions, so both sides start from bitwise the same numbers. Both sides use megatron's local layers (TE's
fused layers name their parameters differently, and a CUDA-less process cannot run them).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # The CPU reference uses megatron's local layers: keep an installed Transformer Engine (NVIDIA's container)
    # out of this CUDA-less process.
    sys.modules["transformer_engine"] = None

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from caopd_megatron.config.schema import DistillConfig, OptimConfig  # noqa: E402
from caopd_megatron.data.records import DistillExample  # noqa: E402
from caopd_megatron.distill.optim import build_optimizer, build_scheduler  # noqa: E402
from caopd_megatron.distill.step import distill_step  # noqa: E402
from caopd_megatron.rollout.sampler import SamplingParams, generate  # noqa: E402
from helpers_models import REAL_VOCAB, tiny_model  # noqa: E402

EOS = 3
PROMPTS = [[5, 9, 11], [7], [12, 4, 30, 8, 21], [6, 6], [17, 2, 33, 9], [25]]
SAMPLING = {"greedy": SamplingParams(max_new_tokens=8, temperature=0.0),
            "sampled": SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)}
EXAMPLES = [DistillExample(prompt_id=str(i), sample_index=0, student_prompt_ids=p, teacher_prompt_ids=[1, 2] + p,
                           response_ids=[(5 * i + j) % (REAL_VOCAB - 4) + 4 for j in range(3 + i)], correct=True,
                           stated_confidence=None, empirical_confidence=1.0, text="")
            for i, p in enumerate(PROMPTS)]
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant")


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def load_weights(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


def sample(model) -> dict[str, list]:
    """``{mode: [(response_ids, logprobs), ...]}`` for every prompt, batch size 4 (two mixed batches)."""
    return {mode: [(g.response_ids, g.logprobs) for g in generate(model, PROMPTS, params, eos_id=EOS,
                                                                   real_vocab_size=REAL_VOCAB, batch_size=4)]
            for mode, params in SAMPLING.items()}


def step_once(student, teacher, fused: bool) -> dict:
    """One ``distill_step`` (micro-batches of 4, clipping at 1.0); the loss, grad norm and updated weights."""
    optimizer = build_optimizer(student, OPTIM)
    scheduler = build_scheduler(optimizer, OPTIM, total_steps=10)
    cfg = DistillConfig(micro_batch_size=4, grad_clip=1.0, fused=fused, chunk_size=8)
    stats = distill_step(student, teacher, optimizer, scheduler, EXAMPLES, cfg, pad_id=0,
                         real_vocab_size=REAL_VOCAB)
    return {"loss": stats.loss, "grad_norm": stats.grad_norm, "weights": weights(student)}


def models(initial: dict | None = None):
    """(student, teacher) of the scenario; with ``initial`` their weights are set from it."""
    student, _ = tiny_model(seed=0, transformer_impl="local")
    teacher, _ = tiny_model(seed=1, transformer_impl="local")
    if initial is not None:
        load_weights(student, initial["student"])
        load_weights(teacher, initial["teacher"])
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def run_scenario(initial: dict | None = None) -> dict:
    student, teacher = models(initial)
    out = {"student": weights(student), "teacher": weights(teacher), "samples": sample(student)}
    for fused in (False, True):
        load_weights(student, out["student"])
        out[f"step_fused={fused}"] = step_once(student, teacher, fused)
    return out


if __name__ == "__main__":
    assert not torch.cuda.is_available(), "the reference runs with CUDA hidden (CUDA_VISIBLE_DEVICES='')"
    torch.save(run_scenario(), sys.argv[1])
