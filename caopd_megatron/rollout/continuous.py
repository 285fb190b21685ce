"""Continuous batching on a static slot cache: shared-prefix prefill, then decode with retire and refill.

Design decisions:
- The unit of work is a ``PromptGroup``: one distinct prompt and the sequences that sample it (the K samples
  ``rollout/engine.py`` asks for). Its prompt is prefilled once, in one slot, and the cache is copied into
  the slots of the other samples (``SlotKVCache.copy_slots``); all K draw their first token from the same
  logits with their own noise keys, as K separate prefills would have.
- Groups are admitted while their whole group fits in the free slots (``group_prompts`` splits a group
  larger than the batch), prefilled together in left-padded forwards of at most ``PREFILL_TOKENS`` tokens.
- Every decode step feeds the live slots ``0..n-1`` one token each. A row leaves when it emits EOS or
  reaches ``max_new_tokens``; the last live slot is copied into its hole, and waiting groups take the free
  slots at the next step. Nobody decodes past its end and the batch stays full while work waits.
- Samples do not depend on any of this: the noise of sequence i's token at position t is keyed by
  ``(seed, i, t)`` (``rollout/sampling.py``), whichever slot and whichever neighbours it has.
- The decoder states the model calls it needs as ``Forward`` requests (``SlotDecoder.forwards``, a generator
  that is sent each call's draws back); ``steps`` runs them one after the other. Under pipeline parallelism
  with one micro-batch every forward is ``stage_forward`` and the last stage broadcasts the draws; with
  several, ``rollout/pipelined.py`` interleaves one decoder per micro-batch over the stages. Either way every
  stage takes the same admission and retirement decisions.
Tensors: tokens and positions ``[b, s]`` on the model's device; logits ``[b, V]`` gathered over TP, on the
last pipeline stage only.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generator, Iterator, Sequence

import torch

from caopd_megatron.parallel.data_parallel import model_groups, pipeline_parallel_size, unwrap
from caopd_megatron.parallel.generation import broadcast_step, stage_forward
from caopd_megatron.rollout.pipelined import microbatch_count, microbatch_rows, run_pipelined
from caopd_megatron.rollout.sampling import Generation, SamplingParams, choose_tokens
from caopd_megatron.runtime.progress import progress

PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward (bounds its activations)


@dataclass
class PromptGroup:
    prompt: list[int]
    members: list[int]  # the caller's indices of the sequences sampling this prompt
    seq_ids: list[int]  # their noise keys


def group_prompts(prompts: Sequence[Sequence[int]], seq_ids: Sequence[int], max_group: int) -> list[PromptGroup]:
    """Identical prompts grouped (in order of first appearance), split into groups of at most ``max_group``
    sequences, sorted by prompt length (stable) so prefills pad little."""
    by_prompt: dict[tuple[int, ...], PromptGroup] = {}
    for i, (p, s) in enumerate(zip(prompts, seq_ids)):
        group = by_prompt.setdefault(tuple(p), PromptGroup(list(p), [], []))
        group.members.append(i)
        group.seq_ids.append(int(s))
    return sorted(split_groups(list(by_prompt.values()), max_group), key=lambda g: len(g.prompt))


def split_groups(groups: Sequence[PromptGroup], max_group: int) -> list[PromptGroup]:
    """``groups`` with every group larger than ``max_group`` sequences cut into consecutive parts (order kept)."""
    return [PromptGroup(g.prompt, g.members[lo: lo + max_group], g.seq_ids[lo: lo + max_group])
            for g in groups for lo in range(0, len(g.members), max_group)]


@dataclass
class Forward:
    """One model call a decoder asks for, and the draws it needs from the call's last-column logits.

    ``tokens`` / ``write_pos`` ``[b, s]``, ``read_len`` and ``rows`` ``[b]`` (None: slots ``0..b-1``) as in
    ``SlotKVCache.plan``; ``pick`` ``[n]``: the logits row of each draw (None: one draw per row); ``seq_ids`` /
    ``positions`` ``[n]``: each draw's noise key. All on the model's device; views of decoder state that stay
    valid until the draws are sent back.
    """
    tokens: torch.Tensor
    write_pos: torch.Tensor
    read_len: int
    rows: torch.Tensor | None
    pick: torch.Tensor | None
    seq_ids: torch.Tensor
    positions: torch.Tensor


Draws = tuple[list[int], list[float]]  # the sampled tokens of a Forward and their log-probabilities


@dataclass
class _Row:
    index: int
    prompt: list[int]
    response: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False


class SlotDecoder:
    """Decodes queued ``PromptGroup``s through ``slots`` cache rows (``steps``); results in ``done``."""

    def __init__(self, model, params: SamplingParams, eos_id: int, real_vocab_size: int, cache,
                 device: torch.device, lean=None):
        self.model, self.params, self.eos_id, self.vocab = model, params, eos_id, real_vocab_size
        self.lean = lean  # a models.slot_forward.SlotForward of the model, or None: megatron's forward
        self.slots, self.device = cache.max_batch_size, device
        self.ctx = cache  # a models.kv_cache_attention.SlotKVCache
        self.groups = model_groups(model)
        self.pipelined = pipeline_parallel_size(self.groups) > 1
        self.rows: list[_Row] = []  # live rows; rows[i] sits in slot i
        self.lengths = torch.zeros(self.slots, dtype=torch.long, device=device)  # cached tokens per slot
        self.last = torch.zeros(self.slots, dtype=torch.long, device=device)  # sampled token not yet fed
        self.keys = torch.zeros(self.slots, dtype=torch.long, device=device)  # noise key (sequence id) per slot
        self.done: dict[int, Generation] = {}
        self.sends: list | None = None  # set by a pipelined schedule: this stage's activations go out async

    # ------------------------------------------------------------------ model calls
    def _logits(self, tokens: torch.Tensor, write_pos: torch.Tensor, read_len: int,
                rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Last-column logits ``[b, V]`` of one forward (None before the last pipeline stage)."""
        mask = self.ctx.plan(write_pos, read_len, rows)
        if self.lean is not None:
            return self.lean.logits(tokens, self.ctx, mask)
        if self.pipelined:
            out = stage_forward(self.model, tokens, write_pos, self.ctx, attention_mask=mask, sends=self.sends)
        else:
            out = self.model(tokens, write_pos, attention_mask=mask, inference_context=self.ctx,
                             runtime_gather_output=True)
        return None if out is None else out[:, -1]

    def run(self, fwd: Forward) -> torch.Tensor | None:
        """This stage's part of ``fwd``: the logits ``[n, V]`` of its draws on the last stage, else None."""
        logits = self._logits(fwd.tokens, fwd.write_pos, fwd.read_len, fwd.rows)
        return logits if logits is None or fwd.pick is None else logits[fwd.pick]

    def draw(self, logits: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens ``[n]`` and log-probabilities ``[n]`` of ``fwd``'s draws from its ``logits`` ``[n, V]``."""
        return choose_tokens(logits, self.params, self.vocab, fwd.seq_ids, fwd.positions)

    def _choose(self, logits: torch.Tensor | None, fwd: Forward) -> Draws:
        if logits is not None:
            nxt, lp = self.draw(logits, fwd)
        else:
            nxt = torch.empty(fwd.seq_ids.numel(), dtype=torch.long, device=self.device)
            lp = torch.empty(fwd.seq_ids.numel(), dtype=torch.float32, device=self.device)
        if self.pipelined:
            broadcast_step(nxt, lp, self.groups)  # only the last stage sampled; every stage needs the tokens
        return nxt.tolist(), lp.tolist()

    # ------------------------------------------------------------------ phases
    def _prefill(self, groups: list[PromptGroup]) -> Generator[Forward, Draws, None]:
        """Prefill each group's prompt into its first slot, copy it to the others, draw everyone's first token."""
        n = len(self.rows)
        first, member_slot, member_group = [], [], []
        for g_idx, g in enumerate(groups):
            first.append(n + len(member_slot))
            for i in g.members:
                member_group.append(g_idx)
                member_slot.append(n + len(member_slot))
                self.rows.append(_Row(i, g.prompt))
        width = max(len(g.prompt) for g in groups)
        tokens = torch.zeros(len(groups), width, dtype=torch.long, device=self.device)
        write_pos = torch.full((len(groups), width), self.ctx.trash, dtype=torch.long, device=self.device)
        for r, g in enumerate(groups):  # left-padded: every row's last prompt token in the last column
            tokens[r, width - len(g.prompt):] = torch.as_tensor(g.prompt, dtype=torch.long)
            write_pos[r, width - len(g.prompt):] = torch.arange(len(g.prompt))
        first_slots = torch.as_tensor(first, device=self.device)
        slots = torch.as_tensor(member_slot, device=self.device)
        pick = torch.as_tensor(member_group, device=self.device)
        lens = torch.as_tensor([len(g.prompt) for g in groups for _ in g.members], device=self.device)
        self.keys[slots] = torch.as_tensor([s for g in groups for s in g.seq_ids], device=self.device)
        drawn = yield Forward(tokens, write_pos, width, first_slots, pick, self.keys[slots], lens)
        src = first_slots[pick]  # the prompt is in the cache now: fork it to the group's other slots
        forked = src != slots
        if bool(forked.any()):
            self.ctx.copy_slots(src[forked], slots[forked], width)
        self.lengths[slots] = lens
        self._record(member_slot, *drawn)

    def _decode_step(self) -> Generator[Forward, Draws, None]:
        n = len(self.rows)
        drawn = yield Forward(self.last[:n].unsqueeze(1), self.lengths[:n].unsqueeze(1),
                              int(self.lengths[:n].max()) + 1, None, None, self.keys[:n], self.lengths[:n] + 1)
        self.lengths[:n] += 1
        self._record(list(range(n)), *drawn)

    def _record(self, slots: list[int], tokens: list[int], logprobs: list[float]) -> None:
        for s, t, lp in zip(slots, tokens, logprobs):
            row = self.rows[s]
            row.response.append(t)
            row.logprobs.append(lp)
            row.finished = t == self.eos_id
        self.last[torch.as_tensor(slots, device=self.device)] = torch.as_tensor(tokens, device=self.device)

    def _retire(self) -> None:
        """Finished rows leave; the last live slots move into their holes (one batched cache copy)."""
        max_new = self.params.max_new_tokens
        holes = [s for s, r in enumerate(self.rows) if r.finished or len(r.response) >= max_new]
        if not holes:
            return
        gone = set(holes)
        for h in holes:
            row = self.rows[h]
            self.done[row.index] = Generation(row.prompt, row.response, row.logprobs, row.finished)
        # Survivors beyond the new live count move into the holes below it (sources and targets disjoint).
        live = len(self.rows) - len(holes)
        dst = [h for h in holes if h < live]
        src = [s for s in range(live, len(self.rows)) if s not in gone]
        for s, d in zip(src, dst):
            self.rows[d] = self.rows[s]
        del self.rows[live:]
        if src:
            s, d = (torch.as_tensor(x, device=self.device) for x in (src, dst))
            self.ctx.copy_slots(s, d, int(self.lengths[s].max()))
            for state in (self.lengths, self.last, self.keys):
                state[d] = state[s]

    def _admit(self, queue: deque[PromptGroup]) -> list[PromptGroup]:
        free = self.slots - len(self.rows)
        admitted = []
        while queue and len(queue[0].members) <= free:
            free -= len(queue[0].members)
            admitted.append(queue.popleft())
        return admitted

    def forwards(self, queue: deque[PromptGroup]) -> Generator[Forward, Draws, None]:
        """Every model call that decodes the groups of ``queue`` (a queue other decoders may share), in order;
        send each one's draws back to get the next."""
        while queue or self.rows:
            admitted = self._admit(queue)
            # Prefill in forwards of bounded padded size (groups are length-sorted, so widths stay close).
            lo = 0
            while lo < len(admitted):
                hi = lo + 1
                while hi < len(admitted) and (hi + 1 - lo) * len(admitted[hi].prompt) <= PREFILL_TOKENS:
                    hi += 1
                yield from self._prefill(admitted[lo:hi])
                lo = hi
            self._retire()
            if self.rows:
                yield from self._decode_step()
                self._retire()

    def steps(self, groups: Sequence[PromptGroup]) -> Iterator[int]:
        """Decode every group, one forward after the other; yields the number of finished sequences after each."""
        plan = self.forwards(deque(groups))
        fwd = next(plan, None)
        while fwd is not None:
            drawn = self._choose(self.run(fwd), fwd)
            yield len(self.done)
            try:
                fwd = plan.send(drawn)
            except StopIteration:
                fwd = None


@torch.inference_mode()
def decode_groups(model, groups: Sequence[PromptGroup], params: SamplingParams, eos_id: int,
                  real_vocab_size: int, slots: int, device: torch.device, desc: str | None = None,
                  pipeline_microbatches: int = 0) -> dict[int, Generation]:
    """Every sequence of ``groups`` decoded through a cache of ``min(slots, sequences)`` rows;
    ``{caller index: Generation}``. ``desc``: a progress bar's label (decode forwards). Under pipeline
    parallelism ``pipeline_microbatches`` micro-batches of up to ``slots`` rows each are in flight (0: one per
    stage; 1: one forward at a time through all stages; ``rollout/pipelined.py``)."""
    if not groups:
        return {}
    # megatron-core is imported when first needed, as everywhere in the package (runtime/backend.py).
    from megatron.core.transformer.attention import SelfAttention

    from caopd_megatron.models.kv_cache_attention import SlotCachedSelfAttention, SlotKVCache
    from caopd_megatron.models.slot_forward import SlotForward, refusal

    plain = [type(m).__name__ for m in unwrap(model).modules()
             if isinstance(m, SelfAttention) and not isinstance(m, SlotCachedSelfAttention)]
    if plain:
        raise TypeError(f"the model's self-attention is {plain[0]}, not SlotCachedSelfAttention: build it with "
                        "caopd_megatron.models.builder (its layer spec serves the rollout cache)")
    if min(len(g.prompt) for g in groups) < 1:
        raise ValueError("every prompt needs at least one token")
    sequences = sum(len(g.members) for g in groups)
    max_len = max(len(g.prompt) for g in groups) + params.max_new_tokens
    stages = pipeline_parallel_size(model_groups(model))
    count = microbatch_count(pipeline_microbatches, stages, sequences) if stages > 1 else 1
    if count == 1:
        slots = min(slots, sequences)
        lean = SlotForward(model) if refusal(model) is None else None
        decoder = SlotDecoder(model, params, eos_id, real_vocab_size, SlotKVCache(slots, max_len), device, lean)
        for _ in progress(decoder.steps(groups), desc=desc, unit="forward"):
            pass
        return decoder.done
    rows = microbatch_rows(slots, sequences, count)
    decoders = [SlotDecoder(model, params, eos_id, real_vocab_size, SlotKVCache(rows, max_len), device)
                for _ in range(count)]
    run_pipelined(model, decoders, deque(split_groups(groups, rows)))
    return {i: g for d in decoders for i, g in d.done.items()}
