"""Peak memory and time per token of distillation-loss forward+backward, side by side.

Methods (all reverse KL, same inputs, per-token loss then ``.backward()`` of a weighted sum):
  (a) ours      caopd_megatron.distill.losses.vocab_parallel_divergence on the logits shards
  (b) naive     all-gather the vocabulary, log_softmax + kl_div (autograd)
  (c) modelopt  ModelOpt's LogitsKLLoss if ``modelopt`` imports, else a faithful re-implementation of its
                algorithm (fp32 copies, MAX all-reduce, sum-exp through differentiable all-reduces, kl_div
                with log_target); the output says which one ran
  (d) fused     fused_chunked_divergence on hidden states + output weights (logits never materialised
                beyond one chunk); time includes the output-layer matmuls
  (e) unfused+matmul  output-layer matmuls + (a), the apples-to-apples baseline for (d)

Memory is the peak of live tensor bytes allocated inside the measured forward+backward, above what was
live when it started (so the inputs are excluded, the gradient is included). On CPU it is read from the
PyTorch profiler's allocator events (every c10 allocation and free, in order: exact tensor bytes,
temporaries inside ops included, immune to allocator caching and RSS noise, so no fresh process per
configuration is needed); on CUDA from ``torch.cuda.max_memory_allocated``. Ratios are given vs the
student logits shard (tokens x V/tp x itemsize) and vs (b). Time is the median wall time of separate,
unprofiled repetitions (TP > 1: the slowest rank), per token.

Usage:
  python benchmarks/bench_losses.py --quick                  # CPU, < 2 min, writes benchmarks/results/
  python benchmarks/bench_losses.py --device cuda --dtype bf16 --tp 1 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from caopd_megatron.distill.divergence_options import DivergenceOptions  # noqa: E402
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence  # noqa: E402
from caopd_megatron.distill.losses import vocab_parallel_divergence  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VOCABS = {"32k": 32000, "128k": 128256, "152k": 152064}
METHODS = ("ours", "naive", "modelopt", "fused", "unfused+matmul")


# ------------------------------------------------------------------------------------------ baselines
class _GatherVocab(torch.autograd.Function):
    """All-gather the vocab shards; backward keeps this rank's slice (the loss after it is replicated)."""

    @staticmethod
    def forward(ctx, shard, group):
        ctx.rank, ctx.part = dist.get_rank(group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.part:(ctx.rank + 1) * ctx.part].contiguous(), None


def naive_reverse_kl(student, teacher, group):
    if group is not None:
        student, teacher = _GatherVocab.apply(student, group), _GatherVocab.apply(teacher, group)
    logp = F.log_softmax(student.float() if student.dtype != torch.float64 else student, dim=-1)
    logq = F.log_softmax(teacher.float() if teacher.dtype != torch.float64 else teacher, dim=-1)
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


class _AllReduceSumBackwardAllReduce(torch.autograd.Function):
    """ModelOpt's all_reduce_autograd: SUM forward, SUM of the gradients backward."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSumBackwardAllReduce.apply(grad, ctx.group), None


class _AllReduceSumBackwardIdentity(torch.autograd.Function):
    """Final TP reduction of the per-rank partial KL (megatron's reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def modelopt_reimpl_reverse_kl(student, teacher, group, temperature=1.0):
    """ModelOpt LogitsKLLoss(reverse=True) algorithm, plain autograd; returns the per-token loss."""
    out_t = teacher.float() / temperature
    out_s = student.float() / temperature
    if group is None:
        return F.kl_div(F.log_softmax(out_t, dim=-1), F.softmax(out_s, dim=-1), reduction="none").sum(-1)
    t_max = out_t.max(dim=-1)[0]
    dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=group)
    out_t = out_t - t_max.unsqueeze(-1)
    denom_t = _AllReduceSumBackwardAllReduce.apply(torch.exp(out_t).sum(-1), group)
    s_max = out_s.max(dim=-1)[0]
    dist.all_reduce(s_max, op=dist.ReduceOp.MAX, group=group)
    out_s = out_s - s_max.unsqueeze(-1).detach()
    denom_s = _AllReduceSumBackwardAllReduce.apply(torch.exp(out_s).sum(-1), group)
    s_logp = out_s - torch.log(denom_s).unsqueeze(-1)
    t_logp = out_t - torch.log(denom_t).unsqueeze(-1)
    partial = F.kl_div(t_logp, s_logp, reduction="none", log_target=True).sum(-1)
    return _AllReduceSumBackwardIdentity.apply(partial, group)


def _modelopt_loss_fn(tp):
    """(callable(student, teacher, group) -> per-token loss, label)."""
    try:
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss  # type: ignore
        from megatron.core import parallel_state
        from megatron.core.transformer import TransformerConfig

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=1,
                                   tensor_model_parallel_size=tp)
        loss_module = LogitsKLLoss(config, temperature=1.0, reverse=True)

        def run(student, teacher, group):
            out = loss_module(student, teacher)
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(0, 1)  # ModelOpt returns [b, s]

        return run, "ModelOpt LogitsKLLoss (modelopt package)"
    except Exception as exc:  # noqa: BLE001 - any failure means the package path is unusable here
        reason = type(exc).__name__
        label = f"re-implementation of ModelOpt LogitsKLLoss ({reason} importing/using modelopt)"
        return modelopt_reimpl_reverse_kl, label


# ---------------------------------------------------------------------------------------- measurement
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn, device):
    """Peak live tensor bytes allocated during fn() above the level at its start."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def timed(fn, device, group, reps, reset):
    times = []
    for _ in range(reps):
        reset()
        if group is not None:
            dist.barrier(group=group)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], device=device)
        if group is not None:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
        times.append(elapsed.item())
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ per rank
def _bench_rank(rank, world, opts, group):
    device = torch.device("cuda", rank) if opts["device"] == "cuda" else torch.device("cpu")
    dtype = DTYPES[opts["dtype"]]
    modelopt_fn, modelopt_label = _modelopt_loss_fn(world)
    rows, checks = [], []
    gen = torch.Generator().manual_seed(1234)
    for vocab_name, tokens in itertools.product(opts["vocabs"], opts["seq_lens"]):
        vocab = VOCABS[vocab_name]
        part = vocab // world
        hidden = opts["hidden"]
        # Same full tensors on every rank (same seed), each keeps its shard.
        hs = torch.randn(tokens, 1, hidden, generator=gen).to(device, dtype)
        ht = torch.randn(tokens, 1, hidden, generator=gen).to(device, dtype)
        # Logit std ~4, a realistic spread for LM heads.
        ws_full = (torch.randn(vocab, hidden, generator=gen) * (4 / hidden ** 0.5)).to(dtype)
        wt_full = (torch.randn(vocab, hidden, generator=gen) * (4 / hidden ** 0.5)).to(dtype)
        ws = ws_full[rank * part:(rank + 1) * part].to(device).requires_grad_()
        wt = wt_full[rank * part:(rank + 1) * part].to(device)
        del ws_full, wt_full
        with torch.no_grad():
            student = (hs @ ws.t()).requires_grad_()
            teacher = ht @ wt.t()
        grad_out = torch.rand(tokens, 1, generator=gen).to(device)
        shard_bytes = student.numel() * student.element_size()

        def reset():
            # Outside the measured region: freeing the previous gradients inside it would hide bytes.
            student.grad, ws.grad, hs.grad = None, None, None

        def step(method):
            if method == "ours":
                loss = vocab_parallel_divergence(student, teacher, DivergenceOptions(tp_group=group))
            elif method == "naive":
                loss = naive_reverse_kl(student, teacher, group)
            elif method == "modelopt":
                loss = modelopt_fn(student, teacher, group)
            elif method == "fused":
                hs.requires_grad_()
                loss = fused_chunked_divergence(hs, ws, ht, wt,
                                                DivergenceOptions(chunk_size=opts["chunk_size"], tp_group=group))
            else:
                hs.requires_grad_()
                with torch.no_grad():
                    t_logits = ht @ wt.t()
                loss = vocab_parallel_divergence(hs @ ws.t(), t_logits, DivergenceOptions(tp_group=group))
            (loss * grad_out).sum().backward()
            hs.requires_grad_(False)
            return loss.detach()

        # Correctness cross-check of every method against an fp64 reference on the gathered logits
        # (first 256 tokens: the fp64 full-vocabulary copy is large).
        with torch.no_grad():
            few = min(tokens, 256)
            reference = naive_reverse_kl(student[:few].double(), teacher[:few].double(), group).cpu()
        check = {}
        for method in METHODS:
            losses = []
            reset()
            row = dict(tp=world, vocab=vocab_name, tokens=tokens, method=method, dtype=opts["dtype"],
                       shard_bytes=shard_bytes, peak_bytes=None, us_per_token=None)
            try:
                peak = peak_extra_bytes(lambda: losses.append(step(method)), device)
            except torch.OutOfMemoryError:  # the same sizes on every rank, so every rank gets here
                rows.append(row)
                reset()
                torch.cuda.empty_cache()
                continue
            check[method] = (losses[0][:few].double().cpu() - reference).abs().max().item()
            peak_t = torch.tensor([float(peak)], device=device)
            if group is not None:
                dist.all_reduce(peak_t, op=dist.ReduceOp.MAX, group=group)
            seconds = timed(lambda: step(method), device, group, opts["reps"], reset)
            rows.append(dict(row, peak_bytes=int(peak_t.item()), us_per_token=seconds / tokens * 1e6))
        checks.append(check)
        del student, teacher, hs, ht, ws, wt
    return dict(rows=rows, checks=checks, modelopt=modelopt_label)


def _worker(rank, world, port, opts, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts["threads"])
    backend = "nccl" if opts["device"] == "cuda" else "gloo"
    if opts["device"] == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = _bench_rank(rank, world, opts, dist.group.WORLD)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run_tp(world, opts):
    if world == 1:
        torch.set_num_threads(opts["threads"])
        return _bench_rank(0, 1, opts, None)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, opts, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return result


# ---------------------------------------------------------------------------------------------- report
def render(rows, header):
    by_key = {(r["tp"], r["vocab"], r["tokens"], r["method"]): r for r in rows}
    lines = header + [
        "",
        "| TP | vocab | tokens | method | peak extra MiB | peak / logits shard | peak / naive | us per token "
        "| time / naive |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        naive = by_key[(r["tp"], r["vocab"], r["tokens"], "naive")]
        if r["peak_bytes"] is None or naive["peak_bytes"] is None:
            lines.append(f"| {r['tp']} | {r['vocab']} | {r['tokens']} | {r['method']} | "
                         + ("OOM |" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f} |")
                         + " | | | |")
            continue
        lines.append(
            f"| {r['tp']} | {r['vocab']} | {r['tokens']} | {r['method']} | {r['peak_bytes'] / 2**20:.1f} | "
            f"{r['peak_bytes'] / r['shard_bytes']:.2f} | {r['peak_bytes'] / naive['peak_bytes']:.2f} | "
            f"{r['us_per_token']:.1f} | {r['us_per_token'] / naive['us_per_token']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU sizes, 1 timed repetition (< 2 min)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocabs", nargs="+", default=list(VOCABS), choices=list(VOCABS))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/losses_<device>)")
    args = parser.parse_args(argv)
    quick = args.quick
    opts = dict(
        device=args.device,
        dtype=args.dtype or ("bf16" if args.device == "cuda" else "fp32"),
        vocabs=args.vocabs,
        seq_lens=args.seq_lens or ([32, 128] if quick else [1024, 4096, 16384] if args.device == "cuda"
                                   else [512, 2048]),
        hidden=args.hidden or (64 if args.device == "cpu" else 2048),
        chunk_size=args.chunk_size or (32 if quick else 1024),
        reps=args.reps or (1 if quick else 3),
        threads=args.threads or max(1, (os.cpu_count() or 2) // max(args.tp)),
    )
    started = time.time()
    rows, checks, labels = [], [], set()
    for world in args.tp:
        result = run_tp(world, opts)
        rows += result["rows"]
        checks += result["checks"]
        labels.add(result["modelopt"])
    elapsed = time.time() - started
    worst = {m: max((c[m] for c in checks if m in c), default=float("nan")) for m in METHODS}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    header = [
        f"# Distillation loss benchmark ({args.device}, {opts['dtype']})",
        "",
        f"Command: `python benchmarks/bench_losses.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Machine: {device_name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{opts['threads']} torch thread(s) per rank; total run {elapsed:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.1f} (timings on a shared CPU are noisy: only the memory columns are robust).  ",
        f"(c) modelopt = {' / '.join(sorted(labels))}.  ",
        "Divergence: reverse KL, T = 1, same padded vocab for student and teacher, batch 1, "
        f"hidden {opts['hidden']} for (d)/(e), fused chunk {opts['chunk_size']} tokens.  ",
        "Peak extra = peak live tensor bytes during forward+backward above the start (inputs excluded, "
        "gradients included); logits shard = tokens x V/tp x itemsize of the student logits. For (d) and (e) "
        "the inputs are hidden states and weights, so their peak includes the logits they create.  ",
        "Max |loss - fp64 reference| over all configurations: "
        + ", ".join(f"{m} {worst[m]:.1e}" for m in METHODS) + ".",
    ]
    table = render(rows, header)
    print(table)
    stem = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"losses_{args.device}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(dict(options=opts, modelopt=sorted(labels), max_abs_loss_diff_vs_fp64=worst,
                       seconds=elapsed, rows=rows), f, indent=1)
    print(f"\nwrote {stem}.md and {stem}.json")


if __name__ == "__main__":
    main()
