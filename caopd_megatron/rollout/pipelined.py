"""Pipeline-parallel decoding with micro-batches in flight: every stage works on a different one at each tick.

Design decisions:
- The live rows are split into M >= PP micro-batches (``rollout.pipeline_microbatches``; 0 = PP), each a
  ``SlotDecoder`` (``rollout/continuous.py``) with its own slot cache of ``min(batch_size, ceil(sequences /
  M))`` rows, all drawing work from one shared queue of prompt groups: retire and refill work per micro-batch
  as on one process, so refill and the pipeline schedule run together. A micro-batch is a full generation
  batch when there is work for it: with M = PP a stage caches M x batch_size rows of its own 1/PP of the
  layers, the memory of a one-process rollout of batch_size rows, and decodes PP times the rows of the
  one-at-a-time schedule per tick.
- Work items are the decoders' forwards, taken round-robin over the micro-batches still working. Every stage
  walks the same item sequence: stage k runs item i when it has stage k-1's activations of item i, so stage k
  is on item i while stage k-1 is on item i+1. The last stage samples item i and sends the draws straight
  back to every other stage (``parallel.generation.send_draws``); a micro-batch's next forward waits for its
  previous draws, which arrive after PP - 1 further items: with M = PP the first stage never waits in steady
  state, and each stage runs a different micro-batch at every tick.
- Sends are asynchronous (``isend``), receives blocking, no collective inside the loop: the dependencies are
  acyclic (an item depends on earlier items only), so the schedule cannot deadlock.
- Every stage applies the same draws in the same order, so admissions from the shared queue, retirements and
  slot moves are identical on all stages; samples are keyed by (seed, sequence, position)
  (``rollout/sampling.py``), so they equal the single-process ones whatever micro-batch a sequence lands in.
Tensors: a decoder's tokens ``[b, s]`` and activations ``[s, b, h]`` on this stage (TP shard as built); the
draws ``[n]`` on every stage after they are received.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence

from caopd_megatron.parallel.data_parallel import is_last_stage, model_groups
from caopd_megatron.parallel.generation import recv_draws, send_draws


def microbatch_count(requested: int, pipeline_stages: int, sequences: int) -> int:
    """Micro-batches in flight: ``requested`` (0 = one per pipeline stage), at most one per sequence."""
    return max(1, min(requested or pipeline_stages, sequences))


def run_pipelined(model, decoders: Sequence, queue: deque) -> list[tuple[int, int]]:
    """Decode every group of ``queue`` through ``decoders`` (``SlotDecoder``s of this stage, one per micro-batch)
    with the micro-batches in flight; results land in each decoder's ``done``. Returns this stage's work log:
    ``(micro-batch, forward index within it)`` per forward, in the order this stage ran them."""
    groups = model_groups(model)
    last = is_last_stage(groups)
    sends: list = []
    for d in decoders:
        d.sends = sends
    plans = [d.forwards(queue) for d in decoders]
    in_flight: dict[int, object] = {}  # micro-batch -> its forward run here, whose draws it has not applied yet
    drawn: dict[int, tuple[list[int], list[float]]] = {}  # last stage: those draws
    ran = [0] * len(decoders)
    log: list[tuple[int, int]] = []
    turn = deque(range(len(decoders)))
    while turn:
        m = turn.popleft()
        try:
            if m in in_flight:
                fwd = in_flight.pop(m)
                if last:
                    result = drawn.pop(m)
                else:
                    tokens, logprobs = recv_draws(fwd.seq_ids.numel(), groups, fwd.seq_ids.device)
                    result = (tokens.tolist(), logprobs.tolist())
                fwd = plans[m].send(result)
            else:
                fwd = next(plans[m])
        except StopIteration:
            continue  # this micro-batch is done and the queue is empty: it leaves the rotation
        logits = decoders[m].run(fwd)
        if last:
            tokens, logprobs = decoders[m].draw(logits, fwd)
            send_draws(tokens, logprobs, groups, sends)
            drawn[m] = (tokens.tolist(), logprobs.tolist())
        in_flight[m] = fwd
        log.append((m, ran[m]))
        ran[m] += 1
        sends[:] = [w for w in sends if not w.is_completed()]
        turn.append(m)
    for w in sends:
        w.wait()
    return log


def microbatch_rows(batch_size: int, sequences: int, microbatches: int) -> int:
    """Cache rows per micro-batch: a full generation batch, or the sequences shared out when they are fewer."""
    return min(batch_size, -(-sequences // microbatches))

