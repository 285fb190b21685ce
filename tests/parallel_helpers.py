"""Helpers shared by the multi-process layout tests (a module imported by tests, not a conftest).

Everything here runs inside a ``dist_harness.run_distributed`` worker: megatron-core is imported lazily so
the parent test process stays light.
"""
from __future__ import annotations

import torch

VOCAB = 40
STUDENT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
               make_vocab_size_divisible_by=32)
TEACHER_B = dict(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                 make_vocab_size_divisible_by=32)


def examples(n: int = 5):
    """``n`` distillation examples with prompts and responses of varying lengths over ids [4, VOCAB)."""
    from caopd_megatron.data.records import DistillExample

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(n):
        sp = torch.randint(4, VOCAB, (3 + i % 3,), generator=g).tolist()
        tp = torch.randint(4, VOCAB, (6 + i,), generator=g).tolist()
        r = torch.randint(4, VOCAB, (2 + (i % 4),), generator=g).tolist()
        out.append(DistillExample(f"p{i}", 0, sp, tp, r, True, None, 0.5, ""))
    return out


def init_parallel(tp: int, pp: int) -> None:
    """(Re-)initialise megatron's parallel state with TP x PP (DP = the rest) on the harness's process group."""
    from megatron.core import parallel_state

    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    detect_backend()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    distributed.initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=0)


def build(model_kw: dict, tp: int, pp: int, seed: int, sp: bool = False):
    """This rank's stage of a seeded GPTModel (the same initial weights in every layout); ``sp``: sequence
    parallelism (with TP > 1)."""
    from caopd_megatron.config.schema import ModelConfig, ParallelConfig
    from caopd_megatron.models.builder import build_gpt_model, resolve_vocab
    from caopd_megatron.runtime.backend import detect_backend
    from caopd_megatron.runtime.distributed import process_groups

    mc = ModelConfig(**model_kw)
    torch.manual_seed(seed)
    return build_gpt_model(mc, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                              sequence_parallel=sp), resolve_vocab(mc, VOCAB, tp), detect_backend(),
                           process_groups())
