"""Rollout throughput: this engine vs the no-cache loop vs HF ``generate``, side by side on the same weights.

One Llama-style model is drawn with ``transformers`` and imported with the project's HF tools
(``checkpointing.hf.import_hf_checkpoint``), so both sides hold identical tensors. For every configuration
(vocabulary, batch, prompt length, K samples per prompt, early EOS or not) the engines run interleaved,
``--reps`` times each, and the median is reported:
  engine   ``rollout.sampler.generate`` (slot cache, rotated keys, shared prefill, retire and refill);
  nocache  ``rollout.reference.generate_without_cache`` (full forward per token; small batches only);
  hf       ``LlamaForCausalLM.generate`` with its KV cache (K samples = the prompt repeated K times).
Time is the process's CPU time over the call (on a shared machine wall time mostly measures the neighbours),
with ``--threads`` torch threads. Without EOS every row decodes ``--new-tokens`` tokens (sampling at
temperature 1; HF with ``min_new_tokens``). With early EOS decoding is greedy on both sides and half the
rows (copies of one prompt) emit EOS as their first token while the others never do: the rows HF keeps
padding and this engine retires. Peak memory: the largest resident-set growth during the call, sampled by
a thread every 2 ms.

Also measured (``--parts mechanisms``): the shared-prefix prefill (K = 8 copies of a 512-token prompt with 1
new token vs one copy) and retirement (half the rows ending at once vs none, beside the floor a retiring
engine cannot beat: a batch of only the rows that go on), at ``--retire-prompts`` prompt lengths. And
(``--parts breakdown``) where each side's time goes: dense products, fused attention, everything else.

    python benchmarks/bench_rollout.py --quick    # a few minutes; writes benchmarks/results/rollout.{json,md}
    python benchmarks/bench_rollout.py            # the whole grid (batch 1/8/32/128, prompts 16/512, K 1/8)
    python benchmarks/bench_rollout.py --vocabs 1024 --parts grid --merge    # a part of it, added to the results
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=704, max_position_embeddings=2048, tie_word_embeddings=False)
NEVER = -1  # an EOS id no row emits


def build_pair(vocab: int, folder: Path):
    """(HF model, megatron model, real vocab) with identical weights, through the project's importer."""
    import transformers

    from caopd_megatron.checkpointing.hf import import_hf_checkpoint, load_megatron_checkpoint, load_model_config
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.data.tokenizer import build_synthetic_tokenizer
    from caopd_megatron.models.builder import build_gpt_model, resolve_vocab
    from caopd_megatron.runtime.backend import detect_backend

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **MODEL)).eval()
    hf.save_pretrained(folder / "hf")
    build_synthetic_tokenizer().save(folder / "hf")
    summary = import_hf_checkpoint(folder / "hf", folder / "ckpt", show_progress=False, overwrite=True)
    cfg = load_model_config(summary.out_dir)
    vocab_info = resolve_vocab(cfg, cfg.vocab_size, 1)
    from caopd_megatron.runtime.distributed import process_groups

    ours = build_gpt_model(cfg, ParallelConfig(), vocab_info, detect_backend(), process_groups())
    load_megatron_checkpoint(summary.out_dir, ours)
    return hf, ours.eval(), vocab_info.real


def measure(fn) -> tuple[float, float]:
    """(CPU seconds of ``fn()``, peak resident-set growth in MiB while it ran)."""
    proc = psutil.Process()
    base, peak, running = proc.memory_info().rss, [0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], proc.memory_info().rss - base)
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.process_time()
    fn()
    cpu = time.process_time() - start
    running[0] = False
    watcher.join()
    return cpu, max(peak[0], 0) / 2**20


def workload(vocab: int, batch: int, prompt_len: int, k: int, early_eos: bool, hf, ours):
    """Prompts (flat, each distinct prompt repeated k times) and the EOS id of one configuration."""
    rng = random.Random(batch * 7919 + prompt_len * 31 + k)
    distinct = [[rng.randrange(4, vocab) for _ in range(prompt_len)] for _ in range(max(1, batch // k))]
    prompts = [p for p in distinct for _ in range(k)][:batch]
    if not early_eos or batch < 2:
        return prompts, NEVER
    # Half the rows: copies of one prompt whose greedy first token becomes EOS; the other half never emit it.
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    head = prompts[0]
    eos = generate(ours, [head], SamplingParams(max_new_tokens=1, temperature=0.0), eos_id=NEVER,
                   real_vocab_size=vocab)[0].response_ids[0]
    tail = [p for p in prompts if p != head]
    return [head] * (batch // 2) + tail[: batch - batch // 2], eos


def run_engine(name: str, hf, ours, prompts, eos: int, vocab: int, new_tokens: int, greedy: bool, seed: int):
    from caopd_megatron.rollout.reference import generate_without_cache
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, seed=seed)
    if name == "engine":
        return lambda: generate(ours, prompts, params, eos_id=eos, real_vocab_size=vocab, batch_size=len(prompts))
    if name == "nocache":
        return lambda: generate_without_cache(ours, prompts, params, eos_id=eos, real_vocab_size=vocab)
    ids = torch.tensor(prompts)  # equal prompt lengths: no padding needed on the HF side

    def hf_generate():
        kw = dict(do_sample=not greedy, max_new_tokens=new_tokens, pad_token_id=0,
                  eos_token_id=eos if eos != NEVER else None, top_k=None, top_p=None)
        if eos == NEVER:
            kw["min_new_tokens"] = new_tokens
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return hf_generate


def bench_grid(args, hf, ours, vocab: int) -> list[dict]:
    rows = []
    grid = itertools.product(args.batches, args.prompts, args.ks, (False, True) if args.early_eos else (False,))
    for batch, prompt_len, k, early in grid:
        if k > batch:
            continue
        prompts, eos = workload(vocab, batch, prompt_len, k, early, hf, ours)
        engines = ["engine", "hf"] + (["nocache"] if batch * prompt_len <= args.nocache_limit else [])
        times = {e: [] for e in engines}
        mems = {e: [] for e in engines}
        for rep in range(args.reps):  # interleaved: each repetition runs every engine once
            for e in engines:
                cpu, mem = measure(run_engine(e, hf, ours, prompts, eos, vocab, args.new_tokens, early, rep))
                times[e].append(cpu)
                mems[e].append(mem)
        row = dict(vocab=vocab, batch=batch, prompt=prompt_len, k=k, early_eos=early, new_tokens=args.new_tokens,
                   reps=args.reps)
        for e in engines:
            row[f"{e}_s"] = statistics.median(times[e])
            row[f"{e}_tok_s"] = batch * args.new_tokens / row[f"{e}_s"]
            row[f"{e}_peak_mib"] = max(mems[e])
        row["engine_vs_hf"] = row["hf_s"] / row["engine_s"]
        if "nocache_s" in row:
            row["engine_vs_nocache"] = row["nocache_s"] / row["engine_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_mechanisms(args, ours, vocab: int) -> list[dict]:
    """Shared-prefix prefill and retirement, engine only, medians of interleaved repetitions; one row per
    retirement prompt length (``--retire-prompts``), each carrying the vocabulary's prefill ratio."""
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    rng = random.Random(1)
    prompt = [rng.randrange(4, vocab) for _ in range(512)]
    one = SamplingParams(max_new_tokens=1, temperature=1.0)
    pre = {"one": [], "k8": []}
    for _ in range(args.reps):
        pre["one"].append(measure(lambda: generate(ours, [prompt], one, eos_id=NEVER, real_vocab_size=vocab))[0])
        pre["k8"].append(measure(lambda: generate(ours, [prompt] * 8, one, eos_id=NEVER, real_vocab_size=vocab))[0])
    prefill = dict(prefill_one_s=statistics.median(pre["one"]), prefill_k8_s=statistics.median(pre["k8"]))
    prefill["prefill_k8_over_one"] = prefill["prefill_k8_s"] / prefill["prefill_one_s"]
    return [dict(vocab=vocab, **prefill, **bench_retirement(args, ours, vocab, n)) for n in args.retire_prompts]


def bench_retirement(args, ours, vocab: int, prompt_len: int) -> dict:
    """Batch 64, greedy, ``--new-tokens``: half the rows end at their first token (``half_end``) vs none
    (``all_long``), against the floor a retiring engine can reach: a batch of only the rows that go on
    (``live_only``). ``prefill``: the prompts with one new token, the part every run shares."""
    from caopd_megatron.rollout.sampler import SamplingParams, generate

    batch = 64
    prompts, eos = workload(vocab, batch, prompt_len, 1, True, None, ours)
    live = prompts[batch // 2:]  # the rows that never emit EOS
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    first = SamplingParams(max_new_tokens=1, temperature=0.0)
    runs = {"all_long": (prompts, NEVER, greedy), "half_end": (prompts, eos, greedy), "live_only": (live, NEVER, greedy),
            "prefill": (prompts, NEVER, first)}
    times = {k: [] for k in runs}
    for _ in range(args.reps):
        for key, (p, e, params) in runs.items():
            times[key].append(measure(lambda: generate(ours, p, params, eos_id=e, real_vocab_size=vocab,
                                                       batch_size=batch))[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(retire_prompt=prompt_len, all_long_s=med["all_long"], half_end_s=med["half_end"],
                live_only_s=med["live_only"], shared_prefill_s=med["prefill"],
                half_end_over_all_long=med["half_end"] / med["all_long"],
                live_only_over_all_long=med["live_only"] / med["all_long"],
                decode_half_over_all=(med["half_end"] - med["prefill"]) / (med["all_long"] - med["prefill"]))


DENSE_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}


def op_seconds(fn, reps: int) -> dict[str, float]:
    """CPU seconds of ``fn()`` by kind: dense products and the fused attention kernel (their self time in one
    run under torch's profiler, after a warm-up run; the profiler times ops by the clock, so run this on a
    quiet machine), and everything else (the median unprofiled time of ``reps`` runs minus those two: the
    other ops and the Python between them, without the profiler's overhead)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    total = statistics.median(measure(fn)[0] for _ in range(reps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    dense = sum(e.self_cpu_time_total for e in events if e.key in DENSE_OPS) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e6
    return dict(dense=dense, attention=attention, other=total - dense - attention)


def bench_breakdown(args, hf, ours, vocab: int) -> list[dict]:
    """Where the time goes, engine vs HF, for the no-EOS K = 1 cells at batch >= 8: both sides run the same
    products and attention on the same weights, so HF's time over ours can at most reach HF's time over our
    dense + attention time (``ceiling``)."""
    rows = []
    for batch, prompt_len in itertools.product([b for b in args.batches if b >= 8], args.prompts):
        prompts, eos = workload(vocab, batch, prompt_len, 1, False, hf, ours)
        parts = {e: op_seconds(run_engine(e, hf, ours, prompts, eos, vocab, args.new_tokens, False, 0), args.reps)
                 for e in ("engine", "hf")}
        row = dict(vocab=vocab, batch=batch, prompt=prompt_len, new_tokens=args.new_tokens)
        for e, p in parts.items():
            row.update({f"{e}_{k}_s": v for k, v in p.items()})
        mine = parts["engine"]
        row["ceiling"] = sum(parts["hf"].values()) / (mine["dense"] + mine["attention"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(args, rows: list[dict], mech: list[dict], commands: list[str], breakdown: list[dict]) -> str:
    def values(key: str, default: int) -> str:  # what the rows (possibly from several parts) were run with
        return "/".join(map(str, sorted({r.get(key, default) for r in rows})))

    lines = [*(f"Command: `{c}`" for c in commands), "",
             f"Model: Llama-style, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
             f"{MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} KV heads, ffn "
             f"{MODEL['intermediate_size']}; {values('new_tokens', args.new_tokens)} new tokens; {args.threads} torch "
             f"thread(s); CPU time, median of {values('reps', args.reps)} interleaved repetition(s); "
             f"load average when written {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             "| vocab | batch | prompt | K | early EOS | engine tok/s | HF tok/s | no-cache tok/s | engine/HF "
             "| engine/no-cache | peak MiB engine / HF |", "|" + "---|" * 11]
    for r in rows:
        nc = f"{r['nocache_tok_s']:.0f}" if "nocache_tok_s" in r else "-"
        ncr = f"{r['engine_vs_nocache']:.1f}x" if "engine_vs_nocache" in r else "-"
        lines.append(f"| {r['vocab']} | {r['batch']} | {r['prompt']} | {r['k']} | {'yes' if r['early_eos'] else 'no'} "
                     f"| {r['engine_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {nc} | {r['engine_vs_hf']:.2f}x | {ncr} "
                     f"| {r['engine_peak_mib']:.0f} / {r['hf_peak_mib']:.0f} |")
    lines += ["", "Shared-prefix prefill and retirement (batch 64, greedy; half the rows end at their first token; the "
              "floor: a batch of only the rows that go on, which a retiring engine cannot beat):", "",
              "| vocab | prefill K=8 x 512 tokens / one prefill | prompt tokens | half the rows ending / none "
              "| floor: live rows only / none | half ending / none, decode only (shared prefill subtracted) |",
              "|---|---|---|---|---|---|"]
    for m in mech:
        floor = f"{m['live_only_over_all_long']:.2f}" if "live_only_over_all_long" in m else "-"
        lines.append(f"| {m['vocab']} | {m['prefill_k8_over_one']:.2f} | {m.get('retire_prompt', 128)} "
                     f"| {m['half_end_over_all_long']:.2f} | {floor} | {m.get('decode_half_over_all', float('nan')):.2f} |")
    if breakdown:
        lines += ["", "Where the time goes (K = 1, no EOS; CPU seconds: dense products / fused attention (their time in "
                  "one profiled run) / everything else (the median unprofiled time minus those)). Both sides do the same products and attention on the same "
                  "weights; `ceiling` = HF's total over our dense + attention, the most any cut of the rest can reach:",
                  "", "| vocab | batch | prompt | engine s | HF s | engine/HF | ceiling |", "|---|---|---|---|---|---|---|"]
        for r in breakdown:
            ours_s = " / ".join(f"{r[f'engine_{k}_s']:.3f}" for k in ("dense", "attention", "other"))
            hf_s = " / ".join(f"{r[f'hf_{k}_s']:.3f}" for k in ("dense", "attention", "other"))
            total = lambda e: sum(r[f"{e}_{k}_s"] for k in ("dense", "attention", "other"))  # noqa: E731
            lines.append(f"| {r['vocab']} | {r['batch']} | {r['prompt']} | {ours_s} | {hf_s} "
                         f"| {total('hf') / total('engine'):.2f}x | {r['ceiling']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="batch 8 and 32, prompts 16 and 256, 32 new tokens, 2 repetitions, no early-EOS rows")
    ap.add_argument("--vocabs", type=int, nargs="*", default=[1024, 32000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-early-eos", dest="early_eos", action="store_false", help="skip the early-EOS rows")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retire-prompts", type=int, nargs="+", default=[16, 128],
                    help="prompt lengths of the retirement measurement (mechanisms part)")
    ap.add_argument("--nocache-limit", type=int, default=1024, help="run the no-cache loop up to batch x prompt")
    ap.add_argument("--parts", nargs="+", choices=["grid", "mechanisms", "breakdown"],
                    default=["grid", "mechanisms", "breakdown"],
                    help="what to run: the engine/HF/no-cache grid, the prefill and retirement measurements, the "
                         "profiled split of each side's time")
    ap.add_argument("--merge", action="store_true",
                    help="add to the results already in --out (rows of the same configuration are replaced), "
                         "so the grid can run in parts")
    ap.add_argument("--merge-from", type=Path, nargs="+", default=[],
                    help="with --merge: also fold in these result files (parts run side by side into other --out)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.prompts, args.ks, args.reps, args.new_tokens = [8, 32], [16, 256], [1, 8], 2, 32
        args.early_eos = False
    torch.set_num_threads(args.threads)
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    detect_backend()  # installs the CPU shims megatron-core needs without CUDA
    distributed.initialize(ParallelConfig(), seed=0)  # a world of one with megatron-core's parallel state
    previous: dict = {section: [] for section in SECTION_KEYS}
    previous["commands"] = []
    for path in ([args.out.with_suffix(".json")] + args.merge_from) if args.merge else []:
        part = json.loads(path.read_text()) if path.is_file() else {}
        for m in part.get("mechanisms", []):
            m.setdefault("retire_prompt", 128)  # results written before the prompt length was a choice
        previous["commands"] += part.get("commands", [])
        for section, key in SECTION_KEYS.items():
            previous[section] = merged(previous[section], part.get(section, []), key)
    command = f"python benchmarks/bench_rollout.py {' '.join(sys.argv[1:])}"
    commands = [c for c in previous["commands"] if c != command] + ([command] if args.vocabs else [])
    new: dict[str, list[dict]] = {section: [] for section in SECTION_KEYS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocabs:  # results written after each vocabulary, so a long run leaves figures
            hf, ours, real = build_pair(vocab, Path(tmp) / str(vocab))
            if "grid" in args.parts:
                new["rows"] += bench_grid(args, hf, ours, real)
            if "mechanisms" in args.parts:
                new["mechanisms"] += bench_mechanisms(args, ours, real)
                print(json.dumps(new["mechanisms"][-len(args.retire_prompts):]), flush=True)
            if "breakdown" in args.parts:
                new["breakdown"] += bench_breakdown(args, hf, ours, real)
            write_results(args, previous, new, commands)
    write_results(args, previous, new, commands)


def write_results(args, previous: dict, new: dict, commands: list[str]) -> None:
    """The previous results with this run's rows folded in, as ``--out``.json and .md."""
    results = dict(commands=commands, **{s: merged(previous[s], new[s], k) for s, k in SECTION_KEYS.items()})
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(args, results["rows"], results["mechanisms"], commands, results["breakdown"])
    args.out.with_suffix(".md").write_text(text)
    print(text)


SECTION_KEYS = {"rows": ("vocab", "batch", "prompt", "k", "early_eos"), "mechanisms": ("vocab", "retire_prompt"),
                "breakdown": ("vocab", "batch", "prompt")}


def merged(old: list[dict], new: list[dict], key: tuple[str, ...]) -> list[dict]:
    """``old`` rows with those of the same ``key`` replaced by ``new`` ones, sorted by ``key``."""
    by_key = {tuple(r[k] for k in key): r for r in old}
    by_key.update({tuple(r[k] for k in key): r for r in new})
    return [by_key[k] for k in sorted(by_key)]


if __name__ == "__main__":
    main()
