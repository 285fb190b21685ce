"""Rollout decoding split over data-parallel replicas vs every replica decoding the whole rollout.

Three runs of the same rollout (same model, prompts, seed), side by side in one invocation:
  (a) single     one process decodes every sequence (the reference samples);
  (b) replicated two processes each decode every sequence at the same time: what DP=2 cost before the split
                 (identical work on both replicas);
  (c) split      two processes joined by gloo as DP=2: each decodes its round-robin share of the batches and
                 the results are all-gathered (``rollout/sampler.py``); its samples are checked to equal (a).
Wall time is the slowest process's, from the start of ``generate`` to its return (gather included); every
process uses one torch thread, so two processes fill the two cores of the CI machine.

A second table prices the counter-based sampling noise that makes the split reproducible: one sampling step
on ``[b, V]`` logits with keyed Gumbel-max (``rollout/keyed_noise.py``) vs ``torch.multinomial`` on the
softmax (the previous sampler), median of repetitions, for vocabularies of 32k and 128k.

    python benchmarks/bench_rollout_split.py            # < 2 min on 2 cores, writes benchmarks/results/
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=1024,
             make_vocab_size_divisible_by=128)


def _rollout(rank: int, world: int, port: int, args, queue) -> None:
    """One process: build the seeded model, time ``generate`` on the shared prompts, report the samples (or the
    traceback, so the parent never waits on a dead child)."""
    try:
        _timed_rollout(rank, world, port, args, queue)
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put((rank, None, None, traceback.format_exc()))


def _timed_rollout(rank: int, world: int, port: int, args, queue) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from caopd_megatron.config.schema import ModelConfig, ParallelConfig
    from caopd_megatron.models.builder import build_gpt_model, resolve_vocab
    from caopd_megatron.rollout import sampler
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    backend = detect_backend()
    distributed.initialize(ParallelConfig(backend="gloo"), seed=0)
    mc = ModelConfig(**MODEL)
    torch.manual_seed(0)
    model = build_gpt_model(mc, ParallelConfig(), resolve_vocab(mc, args.vocab, 1), backend,
                            distributed.process_groups())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, args.vocab, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.sequences)]
    rows = []
    decode = sampler._generate_batch
    sampler._generate_batch = lambda m, batch, *a: rows.append(len(batch)) or decode(m, batch, *a)
    params = sampler.SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=5)
    torch.distributed.barrier()
    start = time.perf_counter()
    # EOS = the first padded vocabulary row: a valid embedding index that is never sampled (fixed-length rollout).
    gens = sampler.generate(model, prompts, params, eos_id=args.vocab, real_vocab_size=args.vocab,
                            batch_size=args.batch_size)
    wall = time.perf_counter() - start
    queue.put((rank, wall, sum(rows), [g.response_ids for g in gens] if rank == 0 else None))
    distributed.teardown()


def _run(world: int, distributed_run: bool, args) -> dict:
    """``world`` processes; ``distributed_run`` joins them as DP replicas, else each is a world of one."""
    from caopd_megatron.runtime.distributed import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rollout, args=(r if distributed_run else 0, world if distributed_run else 1, port,
                                                args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    failed = [err for _, wall, _, err in out if wall is None]
    if failed:
        raise RuntimeError("a rollout process failed:\n" + failed[0])
    samples = next(s for *_, s in out if s is not None)
    return {"wall_s": max(w for _, w, _, _ in out), "decoded_per_process": sorted(n for _, _, n, _ in out),
            "samples": samples}


def _sampling_cost(vocab: int, rows: int, reps: int) -> dict:
    from caopd_megatron.rollout.keyed_noise import gumbel_argmax, row_keys

    torch.set_num_threads(1)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3
    keys = row_keys(3, torch.arange(rows), torch.full((rows,), 17))
    gen = torch.Generator().manual_seed(0)
    fns = {"keyed gumbel-max": lambda: gumbel_argmax(logits, keys),
           "torch.multinomial": lambda: torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)}
    res = {}
    for name, fn in fns.items():
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        res[name] = statistics.median(times) * 1e3
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    t0 = time.time()
    runs = {"single": _run(1, False, args), "replicated": _run(2, False, args), "split": _run(2, True, args)}
    same = runs["split"]["samples"] == runs["single"]["samples"] == runs["replicated"]["samples"]
    cost = {v: _sampling_cost(v, 64, 20) for v in (32_000, 128_000)}
    load = os.getloadavg()[0]
    cmd = "python benchmarks/bench_rollout_split.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "out" and v != ap.get_default(k))
    lines = [
        "# Rollout decoding: DP replicas split the batches vs each decoding everything (cpu, fp32)", "",
        f"Command: `{cmd}`  ",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"1 torch thread per process; total run {time.time() - t0:.0f} s; load average at the end {load:.1f}.  ",
        f"Rollout: {args.sequences} sequences, prompts of 8-39 tokens, {args.new_tokens} new tokens each (no EOS), "
        f"generation batches of {args.batch_size}, model {MODEL['num_layers']} layers x hidden {MODEL['hidden_size']}, "
        f"vocabulary {args.vocab}, temperature 1.  ",
        f"Samples of the split run equal the single process's: **{same}**.", "",
        "| run | processes | sequences decoded per process | wall s (slowest process) | wall / split |",
        "|---|---:|---|---:|---:|",
    ]
    for name, r in runs.items():
        n = 1 if name == "single" else 2
        lines.append(f"| {name} | {n} | {' / '.join(map(str, r['decoded_per_process']))} | {r['wall_s']:.2f} | "
                     f"{r['wall_s'] / runs['split']['wall_s']:.2f} |")
    lines += ["", "One sampling step on [64, V] logits (median of 20, one thread):", "",
              "| vocabulary | keyed gumbel-max ms | torch.multinomial ms | ratio |", "|---:|---:|---:|---:|"]
    for v, c in cost.items():
        lines.append(f"| {v // 1000}k | {c['keyed gumbel-max']:.2f} | {c['torch.multinomial']:.2f} | "
                     f"{c['keyed gumbel-max'] / c['torch.multinomial']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rollout_split.md").write_text(text)
    (out / "rollout_split.json").write_text(json.dumps(
        {"command": cmd, "samples_equal": same, "load_avg": load, "sampling_ms": cost,
         "runs": {k: {kk: vv for kk, vv in r.items() if kk != "samples"} for k, r in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
