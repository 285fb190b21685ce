"""Shared pieces of the GPU benchmarks: sizes, timing and peak memory, the card's matmul rate, model set-up.

Design decisions:
- Two size presets: ``FULL`` (the H200 run: vocabularies 128k and 152k, 8k loss tokens, a ~1.2B Llama-3.2-1B
  shaped student, 2k-token sequences, rollout batch 64 x 256 new tokens) and ``TINY`` (the CPU dry run: the
  same code paths at sizes that take seconds on two cores).
- Time is the median of CUDA-synchronised wall times after warm-up; peak memory is
  ``torch.cuda.max_memory_allocated`` above what was allocated before the call (inputs excluded, outputs and
  gradients included: the benchmarked functions free their gradients before returning), and in total. On CPU memory is reported as None (the CPU loss benchmark has its own profiler method).
- The card's bf16 matmul rate is measured (square bf16 GEMMs), not taken from a datasheet, so MFU is relative
  to what this card, clocks and torch build deliver.
- Models come from the project's own builder (``models.builder.build_gpt_model``) after the project's runtime
  start (``runtime.backend.detect_backend``, ``runtime.distributed.initialize``): what a user's job runs.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from caopd_megatron.config.schema import ModelConfig, ParallelConfig
from caopd_megatron.models.builder import VocabInfo, build_gpt_model, resolve_vocab
from caopd_megatron.runtime import distributed
from caopd_megatron.runtime.backend import Backend, detect_backend


@dataclass(frozen=True)
class Sizes:
    loss_vocabs: Sequence[int]  # real vocabulary sizes of the loss benchmark
    loss_tokens: int
    loss_hidden: int  # hidden size of the fused (hidden states + output weight) variants
    loss_chunk: int  # token chunk of the fused variants
    model: ModelConfig  # student (and EMA teacher) of the step and rollout benchmarks
    step_sequences: int
    step_prompt_tokens: int
    step_response_tokens: int
    step_micro_batch: int
    rollout_batch: int
    rollout_prompt_tokens: int
    rollout_new_tokens: int
    matmul_size: int
    repeats: int


LLAMA_1B = ModelConfig(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                       ffn_hidden_size=8192, vocab_size=128256, max_position_embeddings=4096, rotary_base=500000.0,
                       tie_embeddings=True, params_dtype="bfloat16")
TINY_MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                         vocab_size=500, max_position_embeddings=128, tie_embeddings=True, params_dtype="bfloat16")

FULL = Sizes(loss_vocabs=(128256, 152064), loss_tokens=8192, loss_hidden=4096, loss_chunk=1024, model=LLAMA_1B,
             step_sequences=8, step_prompt_tokens=256, step_response_tokens=1792, step_micro_batch=2,
             rollout_batch=64, rollout_prompt_tokens=128, rollout_new_tokens=256, matmul_size=8192, repeats=3)
TINY = Sizes(loss_vocabs=(1000, 1200), loss_tokens=64, loss_hidden=32, loss_chunk=16, model=TINY_MODEL,
             step_sequences=4, step_prompt_tokens=8, step_response_tokens=24, step_micro_batch=2,
             rollout_batch=4, rollout_prompt_tokens=4, rollout_new_tokens=6, matmul_size=128, repeats=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    median_ms: float
    peak_bytes: Optional[int]  # above the allocation before the call; None on CPU
    peak_total_bytes: Optional[int] = None  # everything allocated at the peak (weights, optimizer state, ...)


def measure(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> Measurement:
    """Median wall time of ``fn()`` over ``repeats`` synchronised calls after ``warmup``, and its peak memory."""
    for _ in range(warmup):
        fn()
    sync(device)
    peak = total = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        total = torch.cuda.max_memory_allocated(device)
        peak = total - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return Measurement(statistics.median(times), peak, total)


def matmul_tflops(device: torch.device, size: int, repeats: int) -> float:
    """Measured dense bf16 GEMM rate (TFLOP/s) of ``[size, size] @ [size, size]``."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    inner = 10 if device.type == "cuda" else 1

    def gemms():
        for _ in range(inner):
            torch.matmul(a, b)

    ms = measure(gemms, device, repeats=max(3, repeats), warmup=2).median_ms
    return 2 * size ** 3 * inner / (ms * 1e-3) / 1e12


def start_runtime(seed: int = 0) -> Backend:
    """The project's runtime start for one process: backend detection (CPU shims without CUDA), groups, seeds."""
    backend = detect_backend()
    distributed.initialize(ParallelConfig(), seed=seed)
    return backend


def build_model(model: ModelConfig, backend: Backend) -> tuple[torch.nn.Module, VocabInfo]:
    """A single-process GPTModel of ``model`` (on the GPU when there is one) and its vocabulary sizes."""
    vocab = resolve_vocab(model, tokenizer_vocab_size=model.vocab_size, tp_size=1)
    return build_gpt_model(model, ParallelConfig(), vocab, backend, distributed.process_groups()), vocab


def count_matmul_parameters(model: ModelConfig, vocab_padded: int) -> int:
    """Parameters that take part in matmuls per token: every decoder weight plus the output layer (the input
    embedding is a lookup). Norm weights are included (negligible)."""
    h, layers = model.hidden_size, model.num_layers
    kv = (model.num_query_groups or model.num_attention_heads) * (model.kv_channels or h // model.num_attention_heads)
    attention = h * h + 2 * h * kv + h * h
    mlp = 3 * h * (model.ffn_hidden_size or 4 * h)
    return layers * (attention + mlp + 2 * h) + h + vocab_padded * h


def attention_flops_per_token(model: ModelConfig, context: int) -> float:
    """Forward FLOPs per token of the score and value matmuls, causal (half of the full ``4 * L * s * h``)."""
    return 2.0 * model.num_layers * context * model.hidden_size
