"""Checks ``rollout/keyed_noise.py``: counter-based Gumbel-max sampling.

References:
- the int64 tensor hash is compared bit for bit with SplitMix64 written in plain Python integers with an
  explicit ``& (2**64 - 1)`` (the textbook unsigned definition), on keys that exercise the sign bit;
- the draws' frequencies over 40,000 independent keys are compared with ``softmax(logits / T)`` computed
  directly (and with top-k filtering: excluded tokens never drawn);
- the vocabulary-chunked argmax equals an unchunked argmax of the same perturbed scores.
"""
from __future__ import annotations

import math

import pytest
import torch

from caopd_megatron.rollout.keyed_noise import GOLDEN, gumbel_argmax, keyed_uniform, mix64, row_keys

M = (1 << 64) - 1


def py_mix(z: int) -> int:
    z &= M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def py_uniform(seed: int, seq: int, pos: int, token: int) -> float:
    key = py_mix(py_mix(py_mix(seed + GOLDEN) + seq * GOLDEN) + pos * GOLDEN)
    return ((py_mix(key + (token + 1) * GOLDEN) >> 11) + 0.5) * 2.0 ** -53


def as_unsigned(t: torch.Tensor) -> list[int]:
    return [v & M for v in t.tolist()]


def test_mix64_equals_unsigned_splitmix64():
    words = [0, 1, 2, 12345, (1 << 63) - 1, -1, -(1 << 63), -987654321, 0x7FFF0000FFFF0000]
    got = as_unsigned(mix64(torch.tensor(words, dtype=torch.int64)))
    assert got == [py_mix(w) for w in words]
    assert len(set(got)) == len(words)


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, -5])
def test_keyed_uniform_equals_reference(seed):
    seqs = torch.tensor([0, 1, 5, 100_000, 2**31 + 11], dtype=torch.long)
    positions = torch.tensor([0, 3, 3, 9, 4096], dtype=torch.long)
    tokens = torch.tensor([0, 1, 2, 127, 128_255], dtype=torch.long)
    u = keyed_uniform(row_keys(seed, seqs, positions), tokens)
    for i, (s, p) in enumerate(zip(seqs.tolist(), positions.tolist())):
        for j, v in enumerate(tokens.tolist()):
            assert float(u[i, j]) == py_uniform(seed & M, s, p, v)
    assert bool(((u > 0) & (u < 1)).all())


def test_keys_differ_in_every_field():
    base = row_keys(3, torch.tensor([4]), torch.tensor([5]))
    for other in (row_keys(4, torch.tensor([4]), torch.tensor([5])), row_keys(3, torch.tensor([5]), torch.tensor([5])),
                  row_keys(3, torch.tensor([4]), torch.tensor([6])), row_keys(3, torch.tensor([5]), torch.tensor([4]))):
        assert int(other) != int(base)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.6, 0), (1.0, 3)])
def test_draw_frequencies_match_softmax(temperature, top_k):
    logits = torch.tensor([1.2, -0.3, 0.4, 2.0, -1.5, 0.0])
    n = 40_000
    scores = (logits / temperature).expand(n, -1).clone()
    if top_k:
        scores[:, torch.argsort(logits)[:-top_k]] = float("-inf")
    want = torch.softmax(scores[0], dim=-1)
    keys = row_keys(11, torch.arange(n), torch.full((n,), 2))
    draws = gumbel_argmax(scores, keys)
    freq = torch.bincount(draws, minlength=logits.numel()).double() / n
    # 5 binomial standard deviations per token: a wrong distribution (e.g. softmax at T=1 for T=0.6) is off
    # by several percentage points, far outside this band.
    band = 5 * torch.sqrt(want.double() * (1 - want.double()) / n) + 1e-12
    assert bool(((freq - want.double()).abs() <= band).all()), (freq, want)
    if top_k:
        assert set(draws.unique().tolist()) == set(torch.argsort(logits)[-top_k:].tolist())


def test_chunked_argmax_equals_unchunked():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=g) * 3
    scores[:, ::7] = float("-inf")
    keys = row_keys(2, torch.arange(64), torch.arange(64))
    u = keyed_uniform(keys, torch.arange(50))
    reference = (scores.double() - torch.log(-torch.log(u))).argmax(dim=-1)
    for chunk in (1, 3, 16, 50, 4096):
        assert torch.equal(gumbel_argmax(scores, keys, chunk=chunk), reference)
    assert not bool((reference % 7 == 0).any())


def test_uniforms_look_uniform():
    u = keyed_uniform(row_keys(0, torch.arange(200), torch.zeros(200, dtype=torch.long)), torch.arange(500))
    assert abs(float(u.mean()) - 0.5) < 0.003
    assert abs(float(u.var()) - 1 / 12) < 0.002
    # Neighbouring sequences and tokens are uncorrelated.
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.01
    assert math.isfinite(float(torch.log(-torch.log(u)).sum()))
