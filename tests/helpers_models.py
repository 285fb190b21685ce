"""Shared test helpers (a module imported by tests, not a conftest): a single-process megatron-core runtime
and a factory for tiny Llama-style GPT models with fixed, reproducible initial weights.

Usage in a test module::

    from helpers_models import runtime, tiny_model   # ``runtime`` is a session-scoped pytest fixture

    def test_x(runtime):
        model, vocab = tiny_model(seed=3)
"""
from __future__ import annotations

import pytest
import torch

# Small enough to build in milliseconds and run a forward in well under a millisecond per token on 2 cores,
# large enough to exercise GQA (4 heads / 2 query groups), SwiGLU, RMSNorm and RoPE.
TINY_MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64)
REAL_VOCAB = 40  # padded to 128 by make_vocab_size_divisible_by=128


def init_runtime():
    """Install the CPU shims and start a gloo world of 1 with megatron-core's parallel state (idempotent)."""
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    backend = detect_backend()
    distributed.initialize(ParallelConfig(), seed=0)
    return backend


@pytest.fixture(scope="session")
def runtime():
    """Session-scoped initialised runtime; returns the ``Backend``."""
    return init_runtime()


def seed_all(seed: int) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def tiny_model(seed: int = 0, real_vocab: int = REAL_VOCAB, **model_overrides):
    """A fresh tiny GPTModel with weights determined by ``seed`` only; returns ``(model, VocabInfo)``."""
    from caopd_megatron.config.schema import ModelConfig, ParallelConfig
    from caopd_megatron.models.builder import build_gpt_model, resolve_vocab

    backend = init_runtime()
    mc = ModelConfig(**{**TINY_MODEL, **model_overrides})
    vocab = resolve_vocab(mc, tokenizer_vocab_size=real_vocab, tp_size=1)
    seed_all(seed)
    from caopd_megatron.runtime.distributed import process_groups

    model = build_gpt_model(mc, ParallelConfig(), vocab, backend, process_groups())
    return model, vocab


def full_logits(model, ids) -> torch.Tensor:
    """Logits ``[len(ids), V_padded]`` of one unpadded sequence from a plain full forward (no KV cache)."""
    tokens = torch.as_tensor([list(ids)], dtype=torch.long)
    positions = torch.arange(tokens.size(1)).unsqueeze(0)
    return model(tokens, positions, attention_mask=None)[0]
