"""The fixed generation cases whose outputs the sampler of before the rollout engine recorded in
``tests/assets/sampler_reference.json`` (see ``tests/test_rollout_engine.py``).

Every case is a tiny seeded model, a list of prompts (mixed lengths, shared prompts repeated K times the
way ``rollout/engine.py`` repeats them), sampling parameters, an EOS id and a generation batch size.
Regenerate (only when a change is meant to alter samples, in its own commit):

    python tests/sampler_cases.py --regenerate
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "sampler_reference.json"
NEVER = 127  # a padded vocabulary row of the 40-token model: never emitted, so no row stops early

# (name, model kwargs, prompt seed, number of distinct prompts, prompt lengths range, K, sampling kwargs,
#  eos id, batch size)
CASES = [
    ("mixed_k3_topp", dict(seed=11, init_method_std=0.2), 0, 7, (1, 7), 3,
     dict(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=5), NEVER, 256),
    ("mixed_k3_small_batches", dict(seed=11, init_method_std=0.2), 0, 7, (1, 7), 3,
     dict(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=5), NEVER, 4),
    ("greedy_k1", dict(seed=11, init_method_std=0.2), 1, 9, (1, 12), 1,
     dict(max_new_tokens=7, temperature=0.0), NEVER, 256),
    ("early_eos_k4", dict(seed=11, init_method_std=0.2), 2, 5, (2, 9), 4,
     dict(max_new_tokens=12, temperature=1.0, seed=9), 5, 8),
    ("vocab1k_long", dict(seed=3, real_vocab=1000, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, init_method_std=0.1), 3, 6, (20, 48), 2,
     dict(max_new_tokens=10, temperature=0.8, top_k=50, seed=2), 364, 5),
]


def case_prompts(prompt_seed: int, n: int, lengths: tuple[int, int], k: int, vocab: int) -> list[list[int]]:
    """``n`` distinct random prompts (token ids in [0, vocab) minus 0..3), each repeated ``k`` times."""
    rng = random.Random(prompt_seed)
    distinct = [[rng.randrange(4, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]
    return [p for p in distinct for _ in range(k)]


def run_case(case, generate_fn) -> list[dict]:
    """The case's generations from ``generate_fn`` (``rollout.sampler.generate``'s signature) as plain dicts."""
    from caopd_megatron.rollout.sampler import SamplingParams
    from helpers_models import tiny_model

    name, model_kwargs, prompt_seed, n, lengths, k, sampling, eos, batch_size = case
    model, vocab = tiny_model(**model_kwargs)
    model.eval()
    prompts = case_prompts(prompt_seed, n, lengths, k, vocab.real)
    gens = generate_fn(model, prompts, SamplingParams(**sampling), eos_id=eos, real_vocab_size=vocab.real,
                       batch_size=batch_size)
    return [dict(response_ids=g.response_ids, logprobs=g.logprobs, finished=g.finished) for g in gens]


if __name__ == "__main__" and "--regenerate" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    from caopd_megatron.rollout.sampler import generate

    torch.set_num_threads(2)
    ASSET.write_text(json.dumps({c[0]: run_case(c, generate) for c in CASES}, indent=0) + "\n")
    print(f"wrote {ASSET}")
