"""A megatron-core GPTModel's weights to and from a checkpoint directory, under any TP/PP layout.

Design decisions:
- Layout-free weights. Distributed-checkpoint keys name *global* tensors (layers stacked on a leading axis,
  QKV grouped by query group, ``[gate; up]``), so one checkpoint loads under any TP/PP layout; megatron-core
  reads each rank's slice. Embedding and output layer are ``allow_shape_mismatch`` in megatron-core, so a
  checkpoint padded for TP=1 still loads under TP=8.
- Weights only. ``_extra_state`` objects (Transformer Engine FP8 metadata; empty for local layers) are not
  written and not requested on load: a conversion/initial-weights checkpoint has no FP8 history.
- Saving uses the streaming strategy (no staging of every tensor, no writer processes). Loading first runs
  the restricted readers (``check_checkpoint_safe``), then compares global shapes with the model so a
  mismatch names the tensor and both shapes, then calls ``dist_checkpointing.load``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from caopd_megatron.checkpointing.hf.adapter import ShapeMismatchError
from caopd_megatron.checkpointing.hf.checkpoint_dir import (
    HF_SOURCE_DIR,
    INFO_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_DIR,
    CheckpointInfo,
    check_checkpoint_safe,
    copy_hf_source,
    copy_tokenizer_files,
    installed_megatron_core_version,
    prepare_out_dir,
    read_checkpoint_info,
    write_model_config,
)
from caopd_megatron.checkpointing.hf.safetensors_io import CheckpointFileError, ConversionError
from caopd_megatron.checkpointing.hf.streaming_save import streaming_save_strategy
from caopd_megatron.config.schema import ModelConfig

log = logging.getLogger(__name__)


def save_megatron_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, *,
                             real_vocab_size: Optional[int] = None, tokenizer_dir: str | Path | None = None,
                             source_architecture: Optional[str] = None, hf_source_dir: str | Path | None = None,
                             overwrite: bool = False) -> Path:
    """Save a (possibly TP/PP-sharded) GPTModel's weights as a checkpoint directory; every rank must call it.

    ``real_vocab_size`` defaults to ``model_cfg.vocab_size``; ``tokenizer_dir`` and ``hf_source_dir``
    (a folder with the HF ``config.json``/``generation_config.json``) are copied in when given.
    """
    from megatron.core import dist_checkpointing, parallel_state

    model = unwrap_gpt_model(model)
    real = real_vocab_size or model_cfg.vocab_size
    if real is None:
        raise ConversionError("save_megatron_checkpoint needs the real vocabulary size (real_vocab_size= or model_cfg.vocab_size)")
    padded = int(getattr(model, "vocab_size", real))
    out = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        prepare_out_dir(out, overwrite)
    if dist.is_initialized():
        dist.barrier()
    sharded = weights_only(model.sharded_state_dict())
    dtype = next(p.dtype for p in model.parameters())
    dist_checkpointing.save(sharded, str(out), sharded_strategy=streaming_save_strategy(None, one_file_per_chunk=False))
    if rank == 0:
        cfg = ModelConfig(**{**asdict(model_cfg), "vocab_size": real, "checkpoint": None, "tokenizer": None})
        write_model_config(out / MODEL_CONFIG_FILE, cfg)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), out / TOKENIZER_DIR)
        if hf_source_dir is not None:
            copy_hf_source(Path(hf_source_dir), out / HF_SOURCE_DIR)
        CheckpointInfo(real_vocab_size=real, padded_vocab_size=padded, source_architecture=source_architecture,
                       dtype=str(dtype).replace("torch.", ""),
                       tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                       pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                       created_by="save_megatron_checkpoint", megatron_core_version=installed_megatron_core_version()).write(out)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_megatron_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module) -> Optional[CheckpointInfo]:
    """Load a checkpoint's weights into ``model`` (this rank's TP/PP shard of a GPTModel); every rank calls it.

    Works for any layout, whatever layout the checkpoint was written under. Returns the checkpoint info
    (None for a plain megatron-core checkpoint without ``caopd_checkpoint.json``).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointFileError(f"checkpoint directory not found: {ckpt}")
    metadata = check_checkpoint_safe(ckpt)  # before anything else reads the pickled parts
    info = read_checkpoint_info(ckpt) if (ckpt / INFO_FILE).is_file() else None
    model = unwrap_gpt_model(model)
    rows = getattr(model, "vocab_size", None)
    if info is not None and rows is not None and info.real_vocab_size > rows:
        raise ConversionError(f"{ckpt}: the checkpoint's vocabulary has {info.real_vocab_size} real rows but the model "
                              f"has only {rows} embedding rows; build the model with vocab_size >= {info.real_vocab_size}")
    sharded = weights_only(model.sharded_state_dict())
    _check_global_shapes(ckpt, sharded, metadata)
    try:
        loaded, missing, unexpected = dist_checkpointing.load(sharded, str(ckpt), strict=StrictHandling.RETURN_ALL)
    except Exception as exc:
        raise CheckpointFileError(f"{ckpt}: loading failed: {exc}") from exc
    if missing:
        raise ConversionError(f"{ckpt}: the model needs tensors the checkpoint lacks: {sorted(missing)[:8]}"
                              " (was it saved from a model with another architecture?)")
    # Keys the checkpoint has that this model does not use (e.g. an output layer when embeddings are tied).
    unused = sorted(k for k in unexpected if not k.endswith("_extra_state"))
    if unused and info is not None:
        log.warning("%s: checkpoint tensors not used by this model: %s", ckpt, unused[:8])
    result = model.load_state_dict(loaded, strict=False)
    absent = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if absent:
        raise ConversionError(f"{ckpt}: parameters not restored from the checkpoint: {absent[:8]}")
    return info


def _check_global_shapes(ckpt: Path, sharded: dict[str, Any], metadata: Any) -> None:
    """Name the tensor and both shapes when the model and the checkpoint disagree (vocabulary rows excepted)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for sh in sharded.values():
        if isinstance(sh, ShardedTensorFactory):
            sh = sh.build()
            shards = sh if isinstance(sh, list) else [sh]
        else:
            shards = [sh]
        for s in shards:
            if not isinstance(s, ShardedTensor):
                continue
            md = metadata.state_dict_metadata.get(s.key)
            if md is None or not hasattr(md, "size"):
                continue  # reported as missing by the loader
            stored, wanted = tuple(md.size), tuple(s.global_shape)
            if s.allow_shape_mismatch:  # vocabulary padding may differ; the hidden size may not
                stored, wanted = stored[1:], wanted[1:]
            if stored != wanted:
                raise ShapeMismatchError(f"{ckpt}: shape mismatch for {s.key}: checkpoint {list(md.size)}, "
                                         f"model {list(s.global_shape)}")


def weights_only(sharded_state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``_extra_state`` objects (FP8 metadata; None on local layers): checkpoints hold weights only."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in sharded_state_dict.items() if not isinstance(v, ShardedObject)}


def unwrap_gpt_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "sharded_state_dict") or type(model).__name__ in ("DistributedDataParallel", "Float16Module"):
        if not hasattr(model, "module"):
            raise ConversionError(f"{type(model).__name__} has no sharded_state_dict(); pass a megatron-core GPTModel")
        model = model.module
    return model
