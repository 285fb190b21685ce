"""Data-parallel gradient reduction with megatron-core's ``DistributedDataParallel``.

Design decisions:
- One switch, ``needs_parallel_path(model)``: PP > 1 or DP > 1, or TP-partial gradients (below). Then the
  student is wrapped in megatron-core's DDP and every training phase runs through ``parallel.schedule``;
  otherwise (single process, plain TP) the model stays a plain ``GPTModel`` and the original path runs.
- TP-partial gradients take the parallel path even at DP = PP = 1: some parameters are replicated over TP
  but each rank's gradient covers only part of the data, so ``finalize_model_grads`` must sum them over TP:
  layer norms under sequence parallelism (each rank sees its slice of the sequence; micro-batch lengths are
  also padded to a multiple of TP there) and QK norms (Qwen3: each rank normalises its own heads). Without
  the sum the TP ranks' copies would drift apart.
- Why megatron's DDP under PP even when DP = 1: its ``finalize_model_grads`` is what all-reduces the tied
  word-embedding gradient between the first and last pipeline stages (and layer-norm gradients under
  sequence parallelism). Using it for every parallel layout keeps one code path.
- DDP configuration: gradients reduced in the parameters' dtype, and one of two reductions:
  - all-reduce (default): gradients accumulate into DDP's contiguous ``main_grad`` buffers during the
    micro-batch backwards; ``finish_gradients`` runs ``finalize_model_grads`` exactly once per optimizer step
    (after the distillation *and* the replay backward, so the tied-embedding all-reduce never double counts)
    and then points each ``param.grad`` at its ``main_grad``, so the project's torch AdamW, LR schedule,
    clipping and per-rank checkpoints work as before;
  - reduce-scatter (``parallel.use_distributed_optimizer`` and DP > 1): DDP is built with
    ``use_distributed_optimizer=True`` (parameters live in a contiguous param buffer too); the same
    ``finalize_model_grads`` reduce-scatters, so DP rank r holds the reduced gradient of its 1/DP range of
    the buffer only, and ``param.grad`` is left alone: megatron's ``DistributedOptimizer``
    (``parallel/distributed_optimizer.py``) reads its range, clips, updates it and all-gathers the
    parameters. With DP = 1 there is nothing to shard and the flag is ignored (logged).
- Overlap (``parallel.overlap_grad_reduce``, DP > 1): DDP's backward hooks launch each bucket's reduction
  asynchronously once the *last* micro-batch's backward has filled it, and ``finalize_model_grads`` waits.
  A step may run several schedule calls (distillation, then replay): only the step's last call may sync
  (``gradient_sync``); earlier calls run entirely under ``no_sync``, and the schedule's own ``no_sync_func``
  is switched off for them, because its exit would re-enable syncing inside our outer ``no_sync``. When some
  replica has no micro-batch in the last call (fewer examples than replicas; one MIN all-reduce of the
  micro-batch count decides, identically on every rank) that call runs under ``no_sync`` too, and
  ``finish_gradients`` launches every bucket in bucket order on every replica: collectives are issued in the
  same order everywhere (what nccl requires), never by hooks on some replicas and by the finaliser on others.
- DDP pre-scales gradients by 1/DP before its SUM all-reduce or SUM reduce-scatter (megatron's "average
  over replicas"). Our per-micro-batch losses are already weighted by their share of the *global* batch, so
  the loss is multiplied by ``loss_scale_for_dp() = DP`` to cancel that pre-scaling: the reduced gradient
  (every element, or this rank's range of elements) is then exactly the gradient of the global-batch loss
  (a power-of-two DP size makes the cancellation bitwise exact).
- ``unwrap`` is used wherever code needs the GPTModel's attributes (output layer, decoder); forward calls go
  through the wrapper unchanged.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")

log = logging.getLogger(__name__)


def data_parallel_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_data_parallel_world_size()


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank()


def pipeline_parallel_size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def needs_parallel_path(model=None) -> bool:
    """True when the step must run on megatron's schedules with a DDP-wrapped student: PP > 1, DP > 1, or
    ``model`` (any wrapper) has TP-partial gradients."""
    return pipeline_parallel_size() > 1 or data_parallel_size() > 1 or (model is not None and
                                                                      tp_partial_gradients(model))


def tp_partial_gradients(model) -> bool:
    """TP-replicated parameters with per-rank partial gradients: norms under sequence parallelism, QK norms."""
    cfg = unwrap(model).config
    return cfg.tensor_model_parallel_size > 1 and bool(cfg.sequence_parallel or cfg.qk_layernorm)


def uses_sequence_parallel(model) -> bool:
    return bool(unwrap(model).config.sequence_parallel)


def sequence_multiple(model) -> int:
    """What every micro-batch length must be a multiple of for ``model``: TP under sequence parallelism, else 1."""
    return unwrap(model).config.tensor_model_parallel_size if uses_sequence_parallel(model) else 1


def unwrap(model):
    """The ``GPTModel`` inside any number of DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def is_wrapped(model) -> bool:
    return hasattr(model, "finish_grad_sync") and hasattr(model, "module")


def wrap_student(model, distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                 bucket_size: int | None = None):
    """Wrap ``model`` in megatron-core DDP when the parallel path is active; return it unchanged otherwise.

    ``distributed_optimizer`` (``parallel.use_distributed_optimizer``): with DP > 1, reduce-scatter gradients
    for megatron's distributed optimizer (``build_optimizer`` then builds that optimizer for this model).
    ``overlap_grad_reduce`` / ``bucket_size`` (``parallel.*``): with DP > 1, reduce bucket by bucket during
    the last micro-batch's backward (module docstring).
    The replicas' parameters are broadcast from DP rank 0, so they start identical whatever each rank built.
    """
    if bucket_size is not None and bucket_size < 1:
        raise ValueError(f"parallel.ddp_bucket_size must be a positive number of elements, got {bucket_size}")
    dp = data_parallel_size()
    sharded = distributed_optimizer and dp > 1
    overlap = overlap_grad_reduce and dp > 1
    if distributed_optimizer and not sharded:
        log.info("parallel.use_distributed_optimizer: DP=1, nothing to shard; the plain AdamW is used")
    if overlap_grad_reduce and not overlap:
        log.info("parallel.overlap_grad_reduce: DP=1, no data-parallel reduction to overlap")
    if not needs_parallel_path(model) or is_wrapped(model):
        return model
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=overlap,
                                               bucket_size=bucket_size, use_distributed_optimizer=sharded,
                                               check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    ddp.broadcast_params()
    log.info("student wrapped in megatron-core DDP (DP=%d, PP=%d, SP=%s, gradients %s%s)", dp,
             pipeline_parallel_size(), uses_sequence_parallel(model),
             "reduce-scattered for the distributed optimizer" if sharded else "all-reduced",
             f", overlapped with the backward in {len(ddp.bucket_groups)} bucket(s)" if overlap else "")
    return ddp


def overlaps_grad_reduce(model) -> bool:
    return is_wrapped(model) and bool(model.ddp_config.overlap_grad_reduce)


@contextlib.contextmanager
def gradient_sync(model, last_call: bool, local_microbatches: int):
    """Around one training schedule call (every DP rank enters it, even with no micro-batch of its own): with
    overlapped reduction, a call runs entirely under DDP's ``no_sync`` (its gradients only accumulate) unless
    it is the step's last and every replica has a micro-batch in it (one MIN all-reduce decides); then
    megatron's schedule enables syncing for its last micro-batch. A no-op without overlap."""
    if not overlaps_grad_reduce(model):
        yield
        return
    last_call = last_call and min_over_dp(local_microbatches, next(model.parameters()).device) > 0
    config = unwrap(model).config
    saved = config.no_sync_func
    # The schedule enters no_sync_func for all micro-batches but the last; for an earlier call it must not
    # touch syncing at all (its exit would flip DDP back to "last micro-batch" inside our no_sync).
    config.no_sync_func = model.no_sync if last_call else None
    try:
        with contextlib.nullcontext() if last_call else model.no_sync():
            yield
    finally:
        config.no_sync_func = saved


def uses_distributed_optimizer(model) -> bool:
    """True for a student wrapped for megatron's distributed optimizer (reduce-scattered gradients)."""
    return is_wrapped(model) and bool(model.ddp_config.use_distributed_optimizer)


def require_wrapped(model, what: str) -> None:
    if needs_parallel_path(model) and not is_wrapped(model):
        raise RuntimeError(f"{what} under PP={pipeline_parallel_size()} / DP={data_parallel_size()} needs the student "
                           f"wrapped by caopd_megatron.parallel.data_parallel.wrap_student (build_student does it)")


def loss_scale_for_dp() -> float:
    """Factor that cancels DDP's 1/DP gradient pre-scaling (losses here are global-batch weighted)."""
    return float(data_parallel_size())


def start_gradients(model, optimizer=None) -> None:
    """Begin an optimizer step: zero DDP's grad buffers and drop ``param.grad`` (it aliases ``main_grad``)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        # A .grad still aliasing main_grad would make autograd accumulate into the buffer AND the DDP hook
        # add it again: it must be None before any backward.
        p.grad = None
    if is_wrapped(model):
        model.zero_grad_buffer()


def finish_gradients(model) -> None:
    """After all backwards of a step: DP all-reduce (or reduce-scatter), tied-embedding / SP reductions, then
    ``p.grad = main_grad`` (all-reduce only; the distributed optimizer reads its range of the buffer itself)."""
    if not is_wrapped(model):
        return
    from megatron.core.distributed import finalize_model_grads

    if overlaps_grad_reduce(model):
        # No call synced this step (a replica had an empty share, see gradient_sync): every replica issues
        # every bucket here, in bucket order. After the first step megatron no longer does this itself.
        for group in model.bucket_groups + model.expert_parallel_bucket_groups:
            if group.grad_reduce_handle is None and not group.is_first_batch:
                group.start_grad_sync()
    finalize_model_grads([model])
    if uses_distributed_optimizer(model):
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        grad = getattr(p, "main_grad", None)
        if grad is None:
            continue
        p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)


def dp_slice(n: int) -> slice:
    """This DP rank's contiguous share of ``n`` items: ``ceil(n / DP)`` each, the last ranks may get fewer."""
    size, rank = data_parallel_size(), data_parallel_rank()
    per = -(-n // size)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def round_robin_dp(items: Sequence[T]) -> list[T]:
    """This DP rank's items when ``items`` are dealt round-robin over the replicas: ``items[rank::DP]``.

    Round-robin rather than contiguous: work items sorted by size (length-sorted generation batches) then
    cost about the same on every replica.
    """
    return list(items[data_parallel_rank()::data_parallel_size()])


def all_gather_dp(value: torch.Tensor, sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Every DP rank's ``value`` (1-D or more; the leading dimension may differ between ranks), in DP-rank
    order, as one padded ``all_gather`` (gloo and nccl need equal shapes). ``sizes``: every rank's leading
    dimension when the caller knows them; otherwise they are exchanged first."""
    from megatron.core import parallel_state

    if data_parallel_size() == 1:
        return [value]
    group = parallel_state.get_data_parallel_group()
    if sizes is None:
        size = torch.tensor([value.size(0)], dtype=torch.long, device=value.device)
        gathered = [torch.empty_like(size) for _ in range(data_parallel_size())]
        torch.distributed.all_gather(gathered, size, group=group)
        sizes = [int(s) for s in gathered]
    longest = max(sizes)
    padded = value.new_zeros((longest, *value.shape[1:]))
    padded[: value.size(0)] = value
    out = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(out, padded, group=group)
    return [o[:s] for o, s in zip(out, sizes)]


def min_over_dp(value: int, device: torch.device) -> int:
    """The smallest ``value`` over the data-parallel replicas (one scalar all-reduce)."""
    from megatron.core import parallel_state

    if data_parallel_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=parallel_state.get_data_parallel_group())
    return int(t)


def all_reduce_dp(value: torch.Tensor) -> torch.Tensor:
    """SUM over the data-parallel group (in place; returned for chaining)."""
    from megatron.core import parallel_state

    if data_parallel_size() > 1:
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value


def broadcast_from_last_stage(value: torch.Tensor) -> torch.Tensor:
    """Every pipeline stage gets the last stage's ``value`` (in place); a no-op without PP."""
    from megatron.core import parallel_state

    if pipeline_parallel_size() > 1:
        torch.distributed.broadcast(value, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return value
