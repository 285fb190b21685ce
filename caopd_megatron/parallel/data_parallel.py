"""Data-parallel gradient reduction (megatron-core DDP) and the DP / PP helpers, all over explicit groups.

Design decisions (long form: ``docs/design.md``, "Data parallelism", "Overlapped gradient reduction"):
- Every helper takes the job's ``ProcessGroupCollection`` (``model_groups(model)``: the groups the model was
  built with); nothing reads megatron's global parallel state.
- ``needs_ddp``: PP > 1, DP > 1, or TP-partial gradients (norms under SP, QK norms) need megatron's DDP and
  its ``finalize_model_grads`` (DP all-reduce or reduce-scatter, tied-embedding and SP/QK-norm sums); a
  single process or plain TP keeps the bare ``GPTModel``. The step's code is the same either way.
- Models are built with ``calculate_per_token_loss`` (``models/builder.py``), so DDP does not pre-scale by
  1/DP: our losses carry their global weight and the SUM over replicas is the global-batch gradient.
- One finalisation per optimizer step (after distillation and replay); with overlapped reduction only the
  step's last schedule call may sync, and a replica without micro-batches makes every replica defer to the
  finaliser, so collectives are issued in the same order everywhere (``gradient_sync``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

T = TypeVar("T")

log = logging.getLogger(__name__)


def model_groups(model) -> ProcessGroupCollection:
    """The process groups ``model`` (any wrapper) was built with (``models.builder.build_gpt_model``)."""
    return unwrap(model).pg_collection


def data_parallel_size(groups: ProcessGroupCollection) -> int:
    return groups.dp.size()


def data_parallel_rank(groups: ProcessGroupCollection) -> int:
    return groups.dp.rank()


def pipeline_parallel_size(groups: ProcessGroupCollection) -> int:
    return groups.pp.size()


def is_last_stage(groups: ProcessGroupCollection) -> bool:
    return groups.pp.rank() == groups.pp.size() - 1


def needs_ddp(model) -> bool:
    """True when ``model`` (any wrapper) must train DDP-wrapped: PP > 1, DP > 1, or TP-partial gradients."""
    groups = model_groups(model)
    return pipeline_parallel_size(groups) > 1 or data_parallel_size(groups) > 1 or tp_partial_gradients(model)


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
    """Wrap ``model`` in megatron-core DDP (over its own process groups) when ``needs_ddp``; else return it.

    ``distributed_optimizer`` (``parallel.use_distributed_optimizer``): with DP > 1, reduce-scatter gradients
    for megatron's distributed optimizer (``build_optimizer`` then builds that optimizer for this model).
    ``overlap_grad_reduce`` / ``bucket_size`` (``parallel.*``): with DP > 1, reduce bucket by bucket during
    the last micro-batch's backward (module docstring).
    The replicas' parameters are broadcast from DP rank 0, so they start identical whatever each rank built.
    """
    if bucket_size is not None and bucket_size < 1:
        raise ValueError(f"parallel.ddp_bucket_size must be a positive number of elements, got {bucket_size}")
    groups = model_groups(model)
    dp = data_parallel_size(groups)
    sharded = distributed_optimizer and dp > 1
    overlap = overlap_grad_reduce and dp > 1
    if distributed_optimizer and not sharded:
        log.info("parallel.use_distributed_optimizer: DP=1, nothing to shard; the plain AdamW is used")
    if overlap_grad_reduce and not overlap:
        log.info("parallel.overlap_grad_reduce: DP=1, no data-parallel reduction to overlap")
    if not needs_ddp(model) or is_wrapped(model):
        return model
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=overlap,
                                               bucket_size=bucket_size, use_distributed_optimizer=sharded,
                                               check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model, pg_collection=groups)
    ddp.broadcast_params()
    log.info("student wrapped in megatron-core DDP (DP=%d, PP=%d, SP=%s, gradients %s%s)", dp,
             pipeline_parallel_size(groups), uses_sequence_parallel(model),
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
    device = next(model.parameters()).device
    last_call = last_call and min_over_dp(local_microbatches, model_groups(model), device) > 0
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
    if needs_ddp(model) and not is_wrapped(model):
        groups = model_groups(model)
        raise RuntimeError(f"{what} under PP={pipeline_parallel_size(groups)} / DP={data_parallel_size(groups)} "
                           f"needs the student wrapped by caopd_megatron.parallel.data_parallel.wrap_student "
                           f"(build_student does it)")


def start_gradients(model) -> None:
    """Begin an optimizer step: drop ``param.grad`` (it may alias ``main_grad``) and zero DDP's grad buffers."""
    for p in model.parameters():
        # A .grad still aliasing main_grad would make autograd accumulate into the buffer AND the DDP hook
        # add it again: it must be None before any backward.
        p.grad = None
    if is_wrapped(model):
        model.zero_grad_buffer()


def finish_gradients(model) -> None:
    """After all backwards of a step: DP all-reduce (or reduce-scatter), tied-embedding / SP reductions, then
    ``p.grad = main_grad`` (all-reduce only; the distributed optimizer reads its range of the buffer itself).
    A no-op for an unwrapped model (one process, plain TP: autograd's ``.grad`` is already the gradient)."""
    if not is_wrapped(model):
        return
    from megatron.core.distributed import finalize_model_grads

    if overlaps_grad_reduce(model):
        # No call synced this step (a replica had an empty share, see gradient_sync): every replica issues
        # every bucket here, in bucket order. After the first step megatron no longer does this itself.
        for group in model.bucket_groups + model.expert_parallel_bucket_groups:
            if group.grad_reduce_handle is None and not group.is_first_batch:
                group.start_grad_sync()
    finalize_model_grads([model], pg_collection=model_groups(model))
    if uses_distributed_optimizer(model):
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        grad = getattr(p, "main_grad", None)
        if grad is None:
            continue
        p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)


def dp_slice(n: int, groups: ProcessGroupCollection) -> slice:
    """This DP rank's contiguous share of ``n`` items: ``ceil(n / DP)`` each, the last ranks may get fewer."""
    size, rank = data_parallel_size(groups), data_parallel_rank(groups)
    per = -(-n // size)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def round_robin_dp(items: Sequence[T], groups: ProcessGroupCollection) -> list[T]:
    """This DP rank's items when ``items`` are dealt round-robin over the replicas: ``items[rank::DP]``.

    Round-robin rather than contiguous: work items sorted by size (length-sorted generation batches) then
    cost about the same on every replica.
    """
    return list(items[data_parallel_rank(groups)::data_parallel_size(groups)])


def all_gather_dp(value: torch.Tensor, groups: ProcessGroupCollection,
                  sizes: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Every DP rank's ``value`` (1-D or more; the leading dimension may differ between ranks), in DP-rank
    order, as one padded ``all_gather`` (gloo and nccl need equal shapes). ``sizes``: every rank's leading
    dimension when the caller knows them; otherwise they are exchanged first."""
    if data_parallel_size(groups) == 1:
        return [value]
    if sizes is None:
        size = torch.tensor([value.size(0)], dtype=torch.long, device=value.device)
        gathered = [torch.empty_like(size) for _ in range(data_parallel_size(groups))]
        torch.distributed.all_gather(gathered, size, group=groups.dp)
        sizes = [int(s) for s in gathered]
    longest = max(sizes)
    padded = value.new_zeros((longest, *value.shape[1:]))
    padded[: value.size(0)] = value
    out = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(out, padded, group=groups.dp)
    return [o[:s] for o, s in zip(out, sizes)]


def min_over_dp(value: int, groups: ProcessGroupCollection, device: torch.device) -> int:
    """The smallest ``value`` over the data-parallel replicas (one scalar all-reduce)."""
    if data_parallel_size(groups) == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=groups.dp)
    return int(t)


def all_reduce_dp(value: torch.Tensor, groups: ProcessGroupCollection) -> torch.Tensor:
    """SUM over the data-parallel group (in place; returned for chaining)."""
    if data_parallel_size(groups) > 1:
        torch.distributed.all_reduce(value, group=groups.dp)
    return value


def broadcast_from_last_stage(value: torch.Tensor, groups: ProcessGroupCollection) -> torch.Tensor:
    """Every pipeline stage gets the last stage's ``value`` (in place); a no-op without PP."""
    if pipeline_parallel_size(groups) > 1:
        last = torch.distributed.get_global_rank(groups.pp, groups.pp.size() - 1)
        torch.distributed.broadcast(value, src=last, group=groups.pp)
    return value
