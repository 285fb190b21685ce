"""Counter-based sampling noise: every random number is a pure function of (seed, sequence, position, token).

Design decisions:
- Sampling is Gumbel-max: ``argmax_v(logits_v / T + G_v)`` with ``G_v = -log(-log U_v)`` draws token v with
  probability ``softmax(logits / T)_v``, exactly the categorical distribution torch's ``multinomial`` samples.
  What changes is where the uniforms come from: not a generator stream whose state depends on every draw made
  before (so on batch size, sort order, which replica generated which batch), but a hash of
  ``(seed, sequence id, position, token id)``. A sequence's sample is therefore the same whatever batch it
  shares, however many data-parallel replicas split the rollout, and whatever TP size pads the vocabulary.
  The same idea as JAX's or Philox's counter-based generators, written with int64 tensor ops so it runs
  unchanged on CPU and GPU.
- The hash is SplitMix64's output function (a bijection on 64-bit words with full avalanche), chained over
  the key fields: ``key = mix(mix(mix(seed + G) + seq * G) + pos * G)``, ``bits_v = mix(key + (v + 1) * G)``
  with ``G`` the 64-bit golden-ratio constant, i.e. the v-th output of a SplitMix64 stream seeded by ``key``.
  torch has no unsigned 64-bit arithmetic: products wrap modulo 2^64 in int64 (two's complement), and the
  logical right shift is an arithmetic shift with the sign-extended bits masked off. The test checks the
  tensor version against a plain-Python implementation with explicit ``& (2**64 - 1)``.
- Uniforms take the top 53 bits: ``(bits >> 11 + 0.5) / 2^53``, in (0, 1) exclusive, so ``log`` never sees
  0 or 1. Scores are formed in float64.
- Memory is bounded: the vocabulary is processed in column chunks with a running max / argmax, so nothing
  larger than ``[b, chunk]`` float64 exists beside the ``[b, V]`` logits the caller already holds.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
VOCAB_CHUNK = 16384


def _signed(c: int) -> int:
    """The int64 with the same 64 bits as the unsigned constant ``c``."""
    c &= _MASK64
    return c - (1 << 64) if c >= (1 << 63) else c


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic: mask the sign-extended bits)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (bits as unsigned words, products modulo 2^64)."""
    z = (z ^ _shr(z, 30)) * _signed(_MUL1)
    z = (z ^ _shr(z, 27)) * _signed(_MUL2)
    return z ^ _shr(z, 31)


def row_keys(seed: int, seq_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[b]`` int64 keys of (seed, sequence id, position); ``seq_ids`` and ``positions`` are ``[b]`` int64."""
    base = mix64(torch.tensor(_signed(seed + GOLDEN), dtype=torch.int64, device=seq_ids.device))
    return mix64(mix64(base + seq_ids * _signed(GOLDEN)) + positions * _signed(GOLDEN))


def keyed_uniform(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``[b, n]`` float64 uniforms in (0, 1) for row keys ``[b]`` and token ids ``[n]`` (int64)."""
    bits = mix64(keys.unsqueeze(-1) + (token_ids.unsqueeze(0) + 1) * _signed(GOLDEN))
    return (_shr(bits, 11).double() + 0.5) * (2.0 ** -53)


def gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor, chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """``argmax_v(scores[:, v] + Gumbel(key, v))`` for ``scores`` ``[b, V]`` (``-inf`` = excluded) -> ``[b]``.

    With ``scores = logits / T`` this is a draw from ``softmax(logits / T)``; chunked over V (see module doc).
    """
    b, vocab = scores.shape
    best = torch.full((b,), float("-inf"), dtype=torch.float64, device=scores.device)
    arg = torch.zeros(b, dtype=torch.long, device=scores.device)
    for lo in range(0, vocab, chunk):
        cols = torch.arange(lo, min(vocab, lo + chunk), device=scores.device)
        u = keyed_uniform(keys, cols)
        perturbed = scores[:, lo: lo + cols.numel()].double() - torch.log(-torch.log(u))
        value, idx = perturbed.max(dim=-1)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, idx + lo, arg)
    return arg
