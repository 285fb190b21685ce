"""Distillation-loss forward + backward on one GPU: this project's losses against the usual alternatives.

Methods (all reverse KL(student || teacher) over the full vocabulary, bf16 inputs, per-token mean):
  ours          ``distill.losses.vocab_parallel_divergence`` on ``[N, V]`` logits (TP = 1)
  ours fused    ``distill.fused_output_loss.fused_chunked_divergence`` on hidden states ``[N, 1, h]`` + output weights
                ``[V, h]`` (the output-layer matmuls are inside, so compare it with ``naive + matmul``)
  naive         ``log_softmax`` + ``kl_div`` with autograd (``benchmarks/bench_losses.naive_reverse_kl``)
  naive+matmul  the output-layer matmuls followed by naive
  liger fused   Liger-Kernel's ``LigerFusedLinearJSD`` with ``jsd_beta=1`` (its reverse KL), when it imports
  floor         one elementwise kernel that reads both logits and writes a gradient-sized tensor: the memory
                traffic any loss over materialised logits must pay at least once
Time and peak memory come from ``common.measure``; the floor's bytes / time is the achieved bandwidth.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from benchmarks.bench_losses import naive_reverse_kl
from benchmarks.gpu.common import Sizes, measure
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
from caopd_megatron.distill.losses import vocab_parallel_divergence

log = logging.getLogger(__name__)


def liger_fused_linear_jsd() -> tuple[Optional[Callable], str]:
    """(Liger's fused linear JSD module or None, a note saying which)."""
    try:
        import liger_kernel
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as exc:  # ImportError, or triton failing to load without a GPU
        return None, f"liger-kernel not usable ({type(exc).__name__}: {exc})"
    version = getattr(liger_kernel, "__version__", "?")
    return LigerFusedLinearJSD(jsd_beta=1.0), f"liger-kernel {version}"


def loss_inputs(vocab: int, sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int):
    """Student/teacher hidden states ``[N, h]`` and output weights ``[V, h]``, and the logits they give ``[N, V]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, h = sizes.loss_tokens, sizes.loss_hidden

    def draw(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hidden_s, hidden_t = draw(n, h, scale=1.0), draw(n, h, scale=1.0)
    weight_s, weight_t = draw(vocab, h, scale=h ** -0.5 * 2), draw(vocab, h, scale=h ** -0.5 * 2)
    return hidden_s, weight_s, hidden_t, weight_t


def bench_vocab(vocab: int, sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per method for this vocabulary size."""
    hidden_s, weight_s, hidden_t, weight_t = loss_inputs(vocab, sizes, device, dtype, seed=vocab)
    with torch.no_grad():
        logits_s, logits_t = hidden_s @ weight_s.t(), hidden_t @ weight_t.t()
    logits_s.requires_grad_(True)
    weight_s.requires_grad_(True)
    hidden_s.requires_grad_(True)
    n = sizes.loss_tokens

    def free_grads():  # so that a measured call starts without gradients and its peak includes them
        logits_s.grad = hidden_s.grad = weight_s.grad = None

    def ours():
        vocab_parallel_divergence(logits_s, logits_t).mean().backward()
        free_grads()

    def ours_fused():
        fused_chunked_divergence(hidden_s.unsqueeze(1), weight_s, hidden_t.unsqueeze(1), weight_t,
                                 DivergenceOptions(chunk_size=sizes.loss_chunk)).mean().backward()
        free_grads()

    def naive():
        naive_reverse_kl(logits_s, logits_t, None).mean().backward()
        free_grads()

    def naive_matmul():
        naive_reverse_kl(hidden_s @ weight_s.t(), hidden_t @ weight_t.t(), None).mean().backward()
        free_grads()

    gradient = torch.empty_like(logits_s, requires_grad=False)

    def floor():
        torch.sub(logits_s.detach(), logits_t, out=gradient)

    methods: list[tuple[str, Callable, str]] = [
        ("ours", ours, "logits"), ("ours fused", ours_fused, "hidden"), ("naive", naive, "logits"),
        ("naive+matmul", naive_matmul, "hidden"), ("floor", floor, "logits")]
    liger, liger_note = liger_fused_linear_jsd()
    if liger is not None and device.type == "cuda":
        def liger_fused():
            liger(hidden_s, weight_s, hidden_t, weight_t).backward()
            free_grads()

        methods.insert(4, ("liger fused", liger_fused, "hidden"))
    elif liger is not None:
        liger_note += "; CPU: its triton kernels need a GPU, skipped"
    rows = []
    logits_bytes = logits_s.numel() * logits_s.element_size()
    for name, fn, reads in methods:
        try:
            m = measure(fn, device, sizes.repeats)
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"vocab": vocab, "method": name, "error": f"out of memory: {exc}"[:200]})
            torch.cuda.empty_cache()
            continue
        row = {"vocab": vocab, "tokens": n, "method": name, "reads": reads, "ms": m.median_ms,
               "us_per_token": m.median_ms * 1e3 / n, "peak_bytes": m.peak_bytes,
               "peak_vs_logits": None if m.peak_bytes is None else m.peak_bytes / logits_bytes}
        if name == "floor":
            row["gb_per_s"] = 3 * logits_bytes / (m.median_ms * 1e-3) / 1e9  # read s, read t, write g
        rows.append(row)
    floor_ms = next((r["ms"] for r in rows if r["method"] == "floor" and "ms" in r), None)
    for row in rows:
        if floor_ms and "ms" in row:
            row["x_floor"] = row["ms"] / floor_ms
        row["liger"] = liger_note
    return rows


def run(sizes: Sizes, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    rows = []
    for vocab in sizes.loss_vocabs:
        log.info("loss benchmark: vocab %d, %d tokens", vocab, sizes.loss_tokens)
        rows.extend(bench_vocab(vocab, sizes, device, dtype))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
