"""Parameter shards under any TP/PP layout, named by their global (single-process) names.

Design decisions:
- A parameter's global name is its single-process ``GPTModel`` name: the local layer index of
  ``decoder.layers.<i>`` is replaced by the layer's own ``layer_number - 1`` (megatron numbers layers
  globally, so no offset arithmetic of ours can drift from megatron's).
- TP shards are described by megatron's own parameter attributes (``tensor_model_parallel``,
  ``partition_dim``, ``partition_stride``). A stride-s shard is s interleaved chunks (SwiGLU's fc1 holds
  ``[gate_r; up_r]``): the full tensor is chunk ``j * tp + r`` = rank r's j-th chunk, the inverse of
  megatron's CPU initialisation split. TP-replicated parameters (norms) come from TP rank 0.
- The last pipeline stage's copy of a tied embedding (``shared``) is skipped when gathering and loaded from
  ``embedding.word_embeddings.weight``.
- Vocabulary-padded tensors (embedding, output layer) may have another padded row count in another TP size:
  loading trims or zero-pads the padding rows (they carry no real token).
- These are whole-model, all-in-memory utilities for tests, tools and small models; production resharding is
  megatron's distributed checkpointing (``checkpointing/distributed_checkpoint.py``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from caopd_megatron.parallel.data_parallel import model_groups, unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class Shard:
    tensor: torch.Tensor  # this rank's piece (a CPU copy)
    partition_dim: int | None  # None: replicated on the TP group
    stride: int
    tp_rank: int
    tp_size: int


def global_name(model, local_name: str) -> str:
    inner = unwrap(model)
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = inner.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end():]


def local_shards(model, grads: bool = False, value_fn=None) -> dict[str, Shard]:
    """This rank's parameters (their ``.grad`` with ``grads=True``, or ``value_fn(param)``, e.g. an optimizer
    moment, which has the parameter's sharding) keyed by global name."""
    inner = unwrap(model)
    tp_rank, tp_size = model_groups(model).tp.rank(), model_groups(model).tp.size()
    out = {}
    for name, p in inner.named_parameters():
        if getattr(p, "shared", False):
            continue
        value = value_fn(p) if value_fn is not None else (p.grad if grads else p)
        if value is None:
            continue
        parallel = bool(getattr(p, "tensor_model_parallel", False)) and tp_size > 1
        out[global_name(inner, name)] = Shard(value.detach().float().cpu().clone(),
                                              int(p.partition_dim) if parallel else None,
                                              int(getattr(p, "partition_stride", 1)), tp_rank, tp_size)
    return out


def assemble(per_rank: list[dict[str, Shard]]) -> dict[str, torch.Tensor]:
    """Full tensors from the ``local_shards`` of every rank of one model replica (any order)."""
    pieces: dict[str, dict[int, Shard]] = {}
    for shards in per_rank:
        for name, shard in shards.items():
            pieces.setdefault(name, {})[shard.tp_rank] = shard
    full = {}
    for name, by_rank in pieces.items():
        first = by_rank[min(by_rank)]
        if first.partition_dim is None:
            full[name] = first.tensor
            continue
        tp, stride, dim = first.tp_size, first.stride, first.partition_dim
        if sorted(by_rank) != list(range(tp)):
            raise ValueError(f"{name}: shards of TP ranks {sorted(by_rank)} given, need 0..{tp - 1}")
        chunks = {r: torch.chunk(by_rank[r].tensor, stride, dim=dim) for r in range(tp)}
        full[name] = torch.cat([chunks[r][j] for j in range(stride) for r in range(tp)], dim=dim)
    return full


def gather_full_state_dict(model, grads: bool = False, value_fn=None) -> dict[str, torch.Tensor]:
    """Collective over the model-parallel group (TP x PP): every rank gets the full replica's tensors."""
    mine = local_shards(model, grads, value_fn)
    group = model_groups(model).mp
    if group.size() == 1:
        return assemble([mine])
    gathered: list = [None] * group.size()
    dist.all_gather_object(gathered, mine, group=group)
    return assemble(gathered)


def fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor``'s first ``rows`` rows, zero-padded when it has fewer (vocabulary padding of another TP size)."""
    if tensor.size(0) >= rows:
        return tensor[:rows]
    pad = torch.zeros((rows - tensor.size(0),) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every parameter from ``full`` (global names, single-process shapes)."""
    inner = unwrap(model)
    tp_rank, tp_size = model_groups(model).tp.rank(), model_groups(model).tp.size()
    for name, p in inner.named_parameters():
        gname = global_name(inner, name)
        if getattr(p, "shared", False) and gname not in full:
            gname = "embedding.word_embeddings.weight"
        if gname not in full:
            raise KeyError(f"{gname} (local {name}) is not in the state dict")
        source = full[gname]
        parallel = bool(getattr(p, "tensor_model_parallel", False)) and tp_size > 1
        if gname in VOCAB_PARAMS or name in VOCAB_PARAMS:
            source = fit_rows(source, p.size(0) * (tp_size if parallel and p.partition_dim == 0 else 1))
        if parallel:
            dim, stride = int(p.partition_dim), int(getattr(p, "partition_stride", 1))
            chunks = torch.chunk(source, tp_size * stride, dim=dim)
            source = torch.cat([chunks[j * tp_size + tp_rank] for j in range(stride)], dim=dim)
        if tuple(source.shape) != tuple(p.shape):
            raise ValueError(f"{gname}: full tensor gives a {tuple(source.shape)} shard, parameter is {tuple(p.shape)}")
        p.copy_(source.to(p.dtype))


@torch.no_grad()
def copy_from_full_depth(stage, full) -> None:
    """Copy a full-depth model's tensors (PP = 1, same TP group) into this pipeline ``stage`` by global name.

    The vocabulary-parallel tensors of ``full`` may have another padded row count (it was built with the
    single-process padding): they are gathered over the TP group, trimmed / zero-padded to the stage's padded
    rows and re-split. All other tensors are the same TP shard on both sides.
    """
    inner, source = unwrap(stage), dict(unwrap(full).named_parameters())
    tp_group = model_groups(stage).tp
    tp_rank, tp_size = tp_group.rank(), tp_group.size()
    for name, p in inner.named_parameters():
        gname = global_name(inner, name)
        if getattr(p, "shared", False) and gname not in source:
            gname = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
        value = source[gname]
        if value.shape != p.shape and gname in VOCAB_PARAMS:
            parts = [torch.empty_like(value) for _ in range(tp_size)]
            if tp_size > 1:
                dist.all_gather(parts, value.contiguous(), group=tp_group)
            else:
                parts = [value]
            value = fit_rows(torch.cat(parts, dim=0), p.size(0) * tp_size).chunk(tp_size, dim=0)[tp_rank]
        p.copy_(value)
