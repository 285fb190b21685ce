"""What each speed lever of the rollout engine bought: the same rollouts timed on successive revisions.

Every revision named on the command line is extracted (``git archive``) into a temporary folder and imported
in its own process; each process builds the benchmark's Llama-style pair (``bench_rollout.build_pair``, the
same seeded weights in every revision), times ``rollout.sampler.generate`` on a few configurations (CPU time,
one torch thread, median of ``--reps`` repetitions; one revision after the other) and
reports a digest of the samples and log-probabilities, so the table also shows that no lever changed a bit.

    python benchmarks/bench_rollout_levers.py c9df0b3 eaa6c57 b44aaf3 ea77ede   # before, then after each lever
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (vocab, batch, prompt tokens, K)
    (1024, 8, 16, 1), (1024, 32, 512, 1), (32000, 8, 16, 1), (32000, 32, 16, 1), (32000, 32, 512, 8)]


def time_revision(tree: Path, reps: int, new_tokens: int) -> dict:
    """In the revision's own process: {config: (CPU seconds, digest)} for every configuration."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch

    import bench_rollout  # puts this checkout first on sys.path: the revision's tree goes before it

    sys.path.insert(0, str(tree))
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.rollout.sampler import SamplingParams, generate
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend

    assert Path(generate.__code__.co_filename).is_relative_to(tree), generate.__code__.co_filename
    torch.set_num_threads(1)
    detect_backend()
    distributed.initialize(ParallelConfig(), seed=0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in sorted({c[0] for c in CONFIGS}):
            hf, ours, real = bench_rollout.build_pair(vocab, Path(tmp) / str(vocab))
            for config in (c for c in CONFIGS if c[0] == vocab):
                _, batch, prompt_len, k = config
                prompts, _ = bench_rollout.workload(real, batch, prompt_len, k, False, hf, ours)
                params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=1)
                times = []
                for _ in range(reps):
                    t = time.process_time()
                    gens = generate(ours, prompts, params, eos_id=-1, real_vocab_size=real, batch_size=batch)
                    times.append(time.process_time() - t)
                digest = hashlib.sha256(json.dumps([(g.response_ids, g.logprobs) for g in gens]).encode()).hexdigest()
                out[str(config)] = (statistics.median(times), digest[:12])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("revisions", nargs="+")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout_levers")
    args = ap.parse_args()
    if args.tree is not None:
        print(json.dumps(time_revision(args.tree, args.reps, args.new_tokens)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rev in args.revisions:
            tree = Path(tmp) / rev
            tree.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
            run = subprocess.run([sys.executable, __file__, rev, "--tree", str(tree), "--reps", str(args.reps),
                                  "--new-tokens", str(args.new_tokens)], check=True, capture_output=True, text=True)
            results[rev] = json.loads(run.stdout.strip().splitlines()[-1])
            print(rev, json.dumps(results[rev]), flush=True)
    lines = [f"Command: `python benchmarks/bench_rollout_levers.py {' '.join(sys.argv[1:])}`", "",
             f"CPU seconds of one `generate` call ({args.new_tokens} new tokens, temperature 1, "
             f"median of {args.reps}); "
             "the digest covers every sample and log-probability.", "",
             "| vocab, batch, prompt, K | " + " | ".join(args.revisions) + " | digests equal |",
             "|---|" + "---|" * (len(args.revisions) + 1)]
    for config in map(str, CONFIGS):
        cells = [results[r][config] for r in args.revisions]
        lines.append(f"| {config.strip('()')} | " + " | ".join(f"{s:.3f}" for s, _ in cells)
                     + f" | {'yes' if len({d for _, d in cells}) == 1 else 'NO'} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
