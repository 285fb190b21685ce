"""The rollout engine choice (``rollout.engine``) and megatron-core's dynamic engine behind ``generate``.

Design decisions:
- ``static`` is the slot-cache engine (``rollout/continuous.py``, any device); ``dynamic`` is megatron-core's
  ``DynamicInferenceEngine`` (paged KV cache, continuous batching, CUDA graphs), whose attention needs CUDA
  and flash-attn >= 2.7.3; ``auto`` takes dynamic where both exist, else static, and logs which and why.
  ``dynamic`` where it cannot run stops the job at start-up with one line (``BackendError``).
- Samples stay keyed: the engine's sampling step (a torch generator stream, so batch-composition dependent)
  is replaced by ``KeyedDraws.draw``: each active request's token is ``choose_tokens`` of its last-token logits
  with noise keyed by (seed, its sequence id, its position), its position being its prompt length plus the
  tokens drawn for it so far. Its temperature-1 log-probability over the real vocabulary is recorded beside
  it. So a dynamic rollout gives the static engine's samples and log-probs up to float rounding of the
  logits, whatever the engine batches, pauses or evicts.
- Responses are built from those records (``KeyedDraws.generations``), not from the engine's output: the
  EOS is kept in the response, ``finished`` means EOS within ``max_new_tokens``, as ``Generation`` defines.
- Chunked prefill is off: a prompt's last-token logits must exist in the step that draws its first token.
- Data parallelism is ``generate``'s deal (each replica runs an engine on its share); the engine handles TP
  and PP over the model's process groups. The megatron-bound parts (the engine, the two versions' sampling
  hooks) are in ``rollout/dynamic_hooks.py``, imported only when the dynamic engine runs.
Tensors: logits ``[n, V]`` of the n active requests (full vocabulary, on the engine's device).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from caopd_megatron.rollout.continuous import PromptGroup
from caopd_megatron.rollout.sampling import Generation, SamplingParams, choose_tokens
from caopd_megatron.runtime.backend import BackendError

log = logging.getLogger(__name__)

FLASH_ATTENTION_MODULES = ("flash_attn", "flash_attn_3", "flashattn_hopper")


def dynamic_engine_blocker(cuda: bool, flash_attention: bool) -> str | None:
    """Why megatron-core's dynamic engine cannot run here (None: it can)."""
    if not cuda:
        return "it needs CUDA and this process has no CUDA device"
    if not flash_attention:
        return "megatron-core's dynamic batching needs flash-attn >= 2.7.3 (or FA3), which is not installed"
    return None


def choose_engine(choice: str, cuda: bool, flash_attention: bool) -> tuple[str, str]:
    """The engine ``rollout.engine=choice`` runs here and why: ``("static" | "dynamic", reason)``.

    Raises ``BackendError`` (one line) for ``dynamic`` where it cannot run."""
    blocker = dynamic_engine_blocker(cuda, flash_attention)
    if choice == "static":
        return "static", "rollout.engine=static"
    if choice == "dynamic":
        if blocker:
            raise BackendError(f"rollout.engine=dynamic (megatron-core's dynamic inference engine): {blocker}; "
                               "use rollout.engine=static or auto")
        return "dynamic", "rollout.engine=dynamic"
    if choice == "auto":
        return ("static", f"rollout.engine=auto: static, dynamic unavailable ({blocker})") if blocker else \
            ("dynamic", "rollout.engine=auto: dynamic (CUDA and flash-attn present)")
    raise BackendError(f"rollout.engine={choice!r} is not one of 'static', 'dynamic', 'auto'")


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def engine_for_this_process(choice: str) -> str:
    """``choose_engine`` with this process's CUDA and flash-attn (both fixed for a process), resolved and logged
    once per choice: the session resolves it at start-up, every rollout step then reads the cached answer."""
    flash = any(importlib.util.find_spec(m) is not None for m in FLASH_ATTENTION_MODULES)
    engine, reason = choose_engine(choice, torch.cuda.is_available(), flash)
    log.info("rollout engine: %s", reason)
    return engine


@dataclass
class _Request:
    prompt: list[int]
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class KeyedDraws:
    """The keyed-noise draws of the requests of one engine run, and their records.

    Request ids are the caller's sequence indices (``PromptGroup.members``)."""

    def __init__(self, groups: Sequence[PromptGroup], params: SamplingParams, eos_id: int, real_vocab_size: int):
        self.params, self.eos_id, self.vocab = params, eos_id, real_vocab_size
        self.requests = {i: _Request(list(g.prompt), s) for g in groups for i, s in zip(g.members, g.seq_ids)}

    def done(self, request_id: int) -> bool:
        r = self.requests[request_id]
        return len(r.tokens) >= self.params.max_new_tokens or (bool(r.tokens) and r.tokens[-1] == self.eos_id)

    def draw(self, logits: torch.Tensor, request_ids: Sequence[int]) -> torch.Tensor:
        """Tokens ``[n]`` for the active requests ``request_ids`` (in the rows' order) from their last-token
        ``logits`` ``[n, V]``; records each token and its log-probability (a request already done records no
        more: an engine that runs it one step longer cannot change its response)."""
        reqs = [self.requests[int(i)] for i in request_ids]
        device = logits.device
        seq_ids = torch.tensor([r.seq_id for r in reqs], dtype=torch.long, device=device)
        positions = torch.tensor([len(r.prompt) + len(r.tokens) for r in reqs], dtype=torch.long, device=device)
        tokens, logprobs = choose_tokens(logits, self.params, self.vocab, seq_ids, positions)
        for i, r, t, lp in zip(request_ids, reqs, tokens.tolist(), logprobs.tolist()):
            if not self.done(int(i)):
                r.tokens.append(t)
                r.logprobs.append(lp)
        return tokens

    def generations(self) -> dict[int, Generation]:
        """``{request id: Generation}`` of every request (``rollout.sampling.Generation``'s conventions)."""
        return {i: Generation(r.prompt, list(r.tokens), list(r.logprobs), self.eos_id in r.tokens)
                for i, r in self.requests.items()}


def decode_dynamic(model, groups: Sequence[PromptGroup], params: SamplingParams, eos_id: int, real_vocab_size: int,
                   slots: int, device: torch.device, desc: str | None = None,
                   pipeline_microbatches: int = 0) -> dict[int, Generation]:
    """``rollout.continuous.decode_groups``'s contract on megatron-core's dynamic engine (CUDA only): every
    sequence of ``groups``, at most ``slots`` requests active at once. ``desc`` and ``pipeline_microbatches``
    are the static engine's knobs (the dynamic engine schedules its own steps)."""
    if not groups:
        return {}
    if device.type != "cuda":
        raise BackendError("rollout.engine=dynamic: the model is not on a CUDA device")
    # The megatron-bound half, imported when the dynamic engine first runs (as the package imports
    # megatron-core elsewhere: runtime/backend.py).
    from caopd_megatron.rollout.dynamic_hooks import run_dynamic_engine

    draws = KeyedDraws(groups, params, eos_id, real_vocab_size)
    max_len = max(len(g.prompt) for g in groups) + params.max_new_tokens
    run_dynamic_engine(model, draws, max_len=max_len, max_requests=min(slots, len(draws.requests)))
    return draws.generations()
