"""Hugging Face -> megatron-core checkpoints, and the project's Megatron checkpoint directory format.

A checkpoint directory holds:

- a megatron-core distributed checkpoint (``torch_dist`` backend: ``metadata.json``, ``common.pt``,
  ``.metadata`` and ``*.distcp`` files), loadable with ``megatron.core.dist_checkpointing.load``;
- ``model_config.yaml``: the project's ``ModelConfig`` (``vocab_size`` = the real vocabulary);
- ``caopd_checkpoint.json``: format version, real and padded vocabulary sizes, source architecture, dtype;
- ``tokenizer/``: the tokenizer files, and ``hf_source/``: the imported model's ``config.json`` and
  ``generation_config.json`` (token ids and generation defaults for a later export).

Design decisions:
- Layout-free weights. Distributed-checkpoint keys name *global* tensors (layers stacked on a leading
  axis, QKV grouped by query group, ``[gate; up]``), so one checkpoint loads under any TP/PP layout;
  megatron-core reads each rank's slice. The import therefore runs in one process and never splits
  tensors for TP; ``--tp`` only chooses the vocabulary padding (a multiple of
  ``make_vocab_size_divisible_by * tp``) and is validated against the model. Embedding and output layer
  are ``allow_shape_mismatch`` in megatron-core, so a checkpoint padded for TP=1 still loads under TP=8.
- Streaming import without a model. No ``GPTModel`` is built: the sharded state dict is made of
  ``ShardedTensor.from_rank_offsets`` entries on the meta device (one per layer and tensor), and the
  real data is produced only when the writer asks for it, from the few HF tensors it needs (q/k/v for a
  QKV tensor). Peak memory is one converted tensor plus its sources, whatever the model size; a 70B model
  converts on a node with ordinary RAM (measured on a 246M-parameter Llama, 938 MiB in fp32: peak
  anonymous memory +129 MiB over the idle process, i.e. its largest tensor, the embedding). The price
  is one ``.distcp`` file per layer and tensor (about 9 x num_layers files).
- Writing goes through ``megatron.core.dist_checkpointing.save`` (its validation that every tensor is
  covered exactly once, ``common.pt``, ``metadata.json``) with our own sharded strategy. megatron-core's
  default ``torch_dist`` writer is unusable here: it stages *every* tensor in memory before writing, forks
  writer processes, and in 0.16.1 needs ``psutil`` (without it the save hangs on CPU). Our strategy hands
  PyTorch DCP a lazy tensor subclass implementing DCP's ``_Checkpointable`` protocol, and DCP's
  ``FileSystemWriter`` (one file per chunk when streaming) resolves and writes one tensor at a time. The
  on-disk format is plain ``torch_dist`` v1: megatron-core's own loader reads it.
- Weights only. ``_extra_state`` objects (Transformer Engine FP8 metadata; empty for local layers) are not
  written and not requested on load: a conversion/initial-weights checkpoint has no FP8 history.
- No pickled code on load. HF weights are read with safetensors (or ``torch.load(weights_only=True)``).
  megatron-core loads ``common.pt`` with ``torch.load`` and PyTorch DCP unpickles ``.metadata`` with plain
  ``pickle``; ``load_megatron_checkpoint`` first re-reads both with the restricted loaders of
  ``checkpointing.safe_pickle`` and refuses the checkpoint if anything else is referenced.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from caopd_megatron.checkpointing.hf.adapter import (
    Dims,
    ShapeMismatchError,
    TensorRule,
    check_shape,
    hf_config_to_model_config,
    hf_shapes,
    ignorable_hf_name,
    layer_indices,
    megatron_shape,
    tensor_rules,
    to_megatron,
)
from caopd_megatron.checkpointing.hf.safetensors_io import (
    CheckpointFileError,
    ConversionError,
    HFWeightReader,
    read_json,
)
from caopd_megatron.checkpointing.safe_pickle import UnsafeCheckpointError, verify_distributed_checkpoint
from caopd_megatron.config.schema import ModelConfig, ParallelConfig

log = logging.getLogger(__name__)

FORMAT_NAME = "caopd-megatron-checkpoint"
FORMAT_VERSION = 1
INFO_FILE = "caopd_checkpoint.json"
MODEL_CONFIG_FILE = "model_config.yaml"
TOKENIZER_DIR = "tokenizer"
HF_SOURCE_DIR = "hf_source"
HF_SOURCE_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------------
# Checkpoint directory: info file and model config
# --------------------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    real_vocab_size: int
    padded_vocab_size: int
    source_architecture: Optional[str]  # HF architecture the weights came from (None: trained from scratch)
    dtype: str  # dtype of the stored tensors
    tensor_model_parallel_size: int  # layout the vocabulary padding was chosen for (any layout loads)
    pipeline_model_parallel_size: int
    created_by: str  # import_hf | save_megatron_checkpoint
    megatron_core_version: str = "unknown"
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def write(self, ckpt_dir: Path) -> None:
        (ckpt_dir / INFO_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")


def read_checkpoint_info(ckpt_dir: str | Path) -> CheckpointInfo:
    path = Path(ckpt_dir) / INFO_FILE
    data = read_json(path, "checkpoint info")
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise CheckpointFileError(f"{path}: not a {FORMAT_NAME} info file")
    if int(data.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointFileError(f"{path}: format version {data.get('format_version')} is newer than this code "
                                  f"understands ({FORMAT_VERSION}); update caopd_megatron")
    try:
        return CheckpointInfo(**{k: data[k] for k in CheckpointInfo.__dataclass_fields__ if k in data})
    except TypeError as exc:
        raise CheckpointFileError(f"{path}: incomplete checkpoint info ({exc})") from None


def write_model_config(path: Path, cfg: ModelConfig) -> None:
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), encoding="utf-8")


def load_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ``ModelConfig`` stored in a checkpoint, with ``tokenizer`` and ``checkpoint`` pointing at this directory.

    Paths are re-derived from where the directory is now, so a checkpoint can be moved or copied.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ckpt = Path(ckpt_dir)
    path = ckpt / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointFileError(f"model config not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
        cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (OmegaConfBaseException, ValueError) as exc:
        raise CheckpointFileError(f"{path}: not a valid model config ({str(exc).splitlines()[0]})") from None
    tok = ckpt / TOKENIZER_DIR
    cfg.tokenizer = str(tok.resolve()) if (tok / "tokenizer.json").is_file() else None
    cfg.checkpoint = str(ckpt.resolve())
    return cfg


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` that exist into ``dst``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _prepare_out_dir(out: Path, overwrite: bool, markers: tuple[str, ...] = (INFO_FILE, "metadata.json")) -> None:
    """Create ``out``; a non-empty one is replaced only with ``overwrite`` and only if it holds one of
    ``markers`` (a previous output), so a mistyped path can never delete unrelated files."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"output directory {out} is not empty; choose a new one or pass overwrite")
        if not any((out / m).exists() for m in markers):
            raise ConversionError(f"refusing to overwrite {out}: it is not empty and holds none of {', '.join(markers)}, "
                                  "so it does not look like an earlier output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------------
# Safe reading of the distributed checkpoint's pickled parts
# --------------------------------------------------------------------------------------------------------


def check_checkpoint_safe(ckpt_dir: str | Path) -> Any:
    """Verify the pickled parts of a distributed checkpoint hold no code; return its DCP metadata."""
    try:
        return verify_distributed_checkpoint(ckpt_dir)
    except UnsafeCheckpointError as exc:
        raise CheckpointFileError(str(exc)) from None


# --------------------------------------------------------------------------------------------------------
# Writing: a lazy, streaming torch_dist strategy
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    offsets: tuple[int, ...]  # global offsets, leading layer axis included
    sizes: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


class _LazyShards(torch.Tensor):
    """This rank's chunks of one global tensor, produced on demand (PyTorch DCP ``_Checkpointable``).

    DCP asks for the chunk list while planning and for each chunk's data only when it writes it, so a chunk
    exists in memory only while it is being written.
    """

    @staticmethod
    def __new__(cls, global_shape: tuple[int, ...], dtype: torch.dtype, chunks: list[_Chunk]) -> "_LazyShards":
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=dtype, device="cpu")

    def __init__(self, global_shape: tuple[int, ...], dtype: torch.dtype, chunks: list[_Chunk]) -> None:
        self._global_shape = torch.Size(global_shape)
        self._dtype = dtype
        self._chunks = chunks

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise NotImplementedError(f"{cls.__name__} is a checkpoint placeholder, not a tensor to compute with ({func})")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(c.offsets), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                                                      properties=TensorProperties(dtype=self._dtype),
                                                      size=self._global_shape))
                for i, c in enumerate(self._chunks)]

    def __create_chunk_list__(self) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in self._chunks]

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        offsets = tuple(index.offset)
        hint = index.index
        candidates = ([self._chunks[hint]] if hint is not None and hint < len(self._chunks) else []) + self._chunks
        for c in candidates:
            if c.offsets == offsets:
                t = c.produce()
                if tuple(t.shape) != c.sizes or t.dtype != self._dtype:
                    raise ConversionError(f"{index.fqn} at {list(offsets)}: produced {list(t.shape)} {t.dtype}, "
                                          f"expected {list(c.sizes)} {self._dtype}")
                return t.contiguous()
        raise ConversionError(f"{index.fqn}: no chunk at offsets {list(offsets)}")


def _is_main_replica(replica_id: Any) -> bool:
    if isinstance(replica_id, int):
        return replica_id == 0
    return all(r == 0 for r in replica_id)


def _streaming_strategy(materialize: Optional[Callable[[Any], torch.Tensor]], one_file_per_chunk: bool):
    """A megatron ``SaveShardedStrategy`` (backend ``torch_dist`` v1) writing through DCP's FileSystemWriter.

    ``materialize(sharded_tensor)`` produces the data of meta-device entries (streaming import).
    ``one_file_per_chunk``: DCP's writer keeps every tensor of a file alive until the file is closed, so
    streaming needs one file per chunk; a model save (tensors already in memory) uses one file per rank.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy

    class StreamingTorchDistSaveStrategy(SaveShardedStrategy):
        def __init__(self) -> None:
            super().__init__("torch_dist", 1)

        @property
        def can_handle_sharded_objects(self) -> bool:
            return True  # there are none: _extra_state objects are filtered out before saving

        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

            groups: dict[str, list[Any]] = defaultdict(list)
            for sh in nested_values(sharded_state_dict):
                if isinstance(sh, ShardedObject):
                    raise ConversionError(f"unexpected sharded object {sh.key} (only weights are checkpointed)")
                if not isinstance(sh, ShardedTensor):
                    raise ConversionError(f"cannot save {type(sh).__name__} entries")
                if sh.flattened_range is not None:
                    raise ConversionError(f"{sh.key}: flattened (distributed-optimizer) shards are not supported here")
                if _is_main_replica(sh.replica_id):
                    groups[sh.key].append(sh)
            state: dict[str, torch.Tensor] = {}
            for key, shards in groups.items():
                chunks = []
                for sh in shards:
                    sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)

                    def produce(sh: Any = sh, sizes: tuple[int, ...] = sizes) -> torch.Tensor:
                        if sh.data is not None and not sh.data.is_meta:
                            data = sh.data.detach()
                        elif materialize is not None:
                            data = materialize(sh)
                        else:
                            raise ConversionError(f"{sh.key}: no data to save")
                        return data.to("cpu").reshape(sizes)

                    chunks.append(_Chunk(tuple(sh.global_offset), sizes, produce))
                state[key] = _LazyShards(tuple(shards[0].global_shape), shards[0].dtype, chunks)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=not one_file_per_chunk,
                                      thread_count=1, sync_files=True)
            dcp.save(state, storage_writer=writer, planner=DefaultSavePlanner())

    return StreamingTorchDistSaveStrategy()


@contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo world of one for the duration of a conversion, unless torch.distributed is already set up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _weights_only(sharded_state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``_extra_state`` objects (FP8 metadata; None on local layers): checkpoints hold weights only."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {k: v for k, v in sharded_state_dict.items() if not isinstance(v, ShardedObject)}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "sharded_state_dict") or type(model).__name__ in ("DistributedDataParallel", "Float16Module"):
        if not hasattr(model, "module"):
            raise ConversionError(f"{type(model).__name__} has no sharded_state_dict(); pass a megatron-core GPTModel")
        model = model.module
    return model


# --------------------------------------------------------------------------------------------------------
# Save / load helpers for models (all ranks call them)
# --------------------------------------------------------------------------------------------------------


def save_megatron_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, model_cfg: ModelConfig, *,
                             real_vocab_size: Optional[int] = None, tokenizer_dir: str | Path | None = None,
                             source_architecture: Optional[str] = None, hf_source_dir: str | Path | None = None,
                             overwrite: bool = False) -> Path:
    """Save a (possibly TP/PP-sharded) GPTModel's weights as a checkpoint directory; every rank must call it.

    ``real_vocab_size`` defaults to ``model_cfg.vocab_size``; ``tokenizer_dir`` and ``hf_source_dir``
    (a folder with the HF ``config.json``/``generation_config.json``) are copied in when given.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    model = _unwrap(model)
    real = real_vocab_size or model_cfg.vocab_size
    if real is None:
        raise ConversionError("save_megatron_checkpoint needs the real vocabulary size (real_vocab_size= or model_cfg.vocab_size)")
    padded = int(getattr(model, "vocab_size", real))
    out = Path(ckpt_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        _prepare_out_dir(out, overwrite)
    if dist.is_initialized():
        dist.barrier()
    sharded = _weights_only(model.sharded_state_dict())
    dtype = next(p.dtype for p in model.parameters())
    dist_checkpointing.save(sharded, str(out), sharded_strategy=_streaming_strategy(None, one_file_per_chunk=False))
    if rank == 0:
        cfg = ModelConfig(**{**asdict(model_cfg), "vocab_size": real, "checkpoint": None, "tokenizer": None})
        write_model_config(out / MODEL_CONFIG_FILE, cfg)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), out / TOKENIZER_DIR)
        if hf_source_dir is not None:
            _copy_hf_source(Path(hf_source_dir), out / HF_SOURCE_DIR)
        CheckpointInfo(real_vocab_size=real, padded_vocab_size=padded, source_architecture=source_architecture,
                       dtype=str(dtype).replace("torch.", ""),
                       tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                       pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                       created_by="save_megatron_checkpoint", megatron_core_version=_mcore_version()).write(out)
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
    model = _unwrap(model)
    rows = getattr(model, "vocab_size", None)
    if info is not None and rows is not None and info.real_vocab_size > rows:
        raise ConversionError(f"{ckpt}: the checkpoint's vocabulary has {info.real_vocab_size} real rows but the model "
                              f"has only {rows} embedding rows; build the model with vocab_size >= {info.real_vocab_size}")
    sharded = _weights_only(model.sharded_state_dict())
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


def _mcore_version() -> str:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:
        return "unknown"


def _copy_hf_source(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in HF_SOURCE_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------------
# HF -> Megatron import
# --------------------------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    out_dir: str
    architecture: str
    hf_tensors_read: int
    megatron_tensors_written: int  # chunks: one per layer and tensor
    bytes_written: int
    dtype: str
    real_vocab_size: int
    padded_vocab_size: int
    tokenizer_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        tok = ", ".join(self.tokenizer_files) if self.tokenizer_files else "none found (add tokenizer files by hand)"
        return (f"imported {self.architecture} -> {self.out_dir}\n"
                f"  {self.hf_tensors_read} HF tensors -> {self.megatron_tensors_written} megatron tensor chunks, "
                f"{self.bytes_written / 2**20:.1f} MiB ({self.dtype}) in {self.seconds:.1f}s\n"
                f"  vocabulary: {self.real_vocab_size} real rows, padded to {self.padded_vocab_size}\n"
                f"  tokenizer files: {tok}\n"
                f"  loads under any TP/PP layout: set model.checkpoint={self.out_dir}")


def import_hf_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, tensor_model_parallel_size: int = 1,
                         pipeline_model_parallel_size: int = 1, dtype: Optional[str] = None,
                         make_vocab_size_divisible_by: int = 128, show_progress: bool = True,
                         overwrite: bool = False) -> ImportSummary:
    """Convert an HF Llama/Qwen2/Qwen3 folder into a checkpoint directory (single process, streaming).

    ``dtype`` (float32/bfloat16/float16) casts the weights; default: keep the HF tensors' dtype.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from caopd_megatron.models.builder import padded_vocab_size
    from caopd_megatron.runtime.backend import import_megatron_core
    from caopd_megatron.runtime.distributed import check_layout

    start = time.time()
    import_megatron_core()
    hf = Path(hf_dir)
    if not hf.is_dir():
        raise CheckpointFileError(f"Hugging Face model folder not found: {hf}")
    hf_config = read_json(hf / "config.json", "HF config")
    model_cfg, family = hf_config_to_model_config(hf_config, make_vocab_size_divisible_by)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    check_layout(tp * pp, ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                 model_cfg.num_layers, model_cfg.num_attention_heads, model_cfg.num_query_groups)
    d = Dims.of(model_cfg)
    real = d.vocab
    padded = padded_vocab_size(real, make_vocab_size_divisible_by, tp)
    rules = tensor_rules(model_cfg, family)

    with HFWeightReader(hf) as reader:
        src_dtype = _validate_hf_tensors(reader, rules, d, model_cfg)
        if dtype is not None and dtype not in DTYPES:
            raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        target = DTYPES[dtype] if dtype else src_dtype
        target_name = str(target).replace("torch.", "")
        if target_name not in DTYPES:
            raise ConversionError(f"HF weights are {target}; pass dtype= one of {', '.join(DTYPES)}")
        model_cfg.params_dtype = target_name

        sharded, producers = _import_state_dict(rules, d, padded, target, reader, ShardedTensor)
        n_chunks = len(producers)
        out = Path(out_dir)
        _prepare_out_dir(out, overwrite)
        bar = _progress_bar(n_chunks, f"import {family.architecture}", show_progress)
        stats = {"bytes": 0, "hf": 0}

        def materialize(sh: Any) -> torch.Tensor:
            produce, n_hf = producers[(sh.key, tuple(sh.global_offset))]
            t = produce()
            stats["bytes"] += t.numel() * t.element_size()
            stats["hf"] += n_hf
            if bar is not None:
                bar.set_postfix_str(f"{sh.key.replace('decoder.layers.', '')} L{sh.global_offset[0] if sh.prepend_axis_num else '-'}",
                                    refresh=False)
                bar.update(1)
            return t

        try:
            with single_process_group():
                import torch.distributed as dist

                if dist.get_world_size() != 1:
                    raise ConversionError("run the HF import in a single process (the checkpoint it writes loads "
                                          f"under any layout); this process group has {dist.get_world_size()} ranks")
                dist_checkpointing.save(sharded, str(out),
                                        sharded_strategy=_streaming_strategy(materialize, one_file_per_chunk=True))
        finally:
            if bar is not None:
                bar.close()

    model_cfg.checkpoint = None
    model_cfg.tokenizer = None
    write_model_config(out / MODEL_CONFIG_FILE, model_cfg)
    tok_files = copy_tokenizer_files(hf, out / TOKENIZER_DIR)
    _copy_hf_source(hf, out / HF_SOURCE_DIR)
    CheckpointInfo(real_vocab_size=real, padded_vocab_size=padded, source_architecture=family.architecture,
                   dtype=target_name, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   created_by="import_hf", megatron_core_version=_mcore_version()).write(out)
    return ImportSummary(out_dir=str(out), architecture=family.architecture, hf_tensors_read=stats["hf"],
                         megatron_tensors_written=n_chunks, bytes_written=stats["bytes"], dtype=target_name,
                         real_vocab_size=real, padded_vocab_size=padded, tokenizer_files=tok_files,
                         seconds=time.time() - start)


def _validate_hf_tensors(reader: HFWeightReader, rules: list[TensorRule], d: Dims, cfg: ModelConfig) -> torch.dtype:
    """Check names and shapes of every HF tensor from the file headers, before anything is written."""
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        for layer in layer_indices(rule, d):
            for name, shape in zip(rule.hf_for_layer(layer), hf_shapes(rule, d)):
                expected[name] = shape
    missing = [n for n in expected if n not in reader]
    if missing:
        raise CheckpointFileError(f"{reader.folder}: {len(missing)} tensors the config implies are missing from the "
                                  f"weights, e.g. {missing[:5]}")
    unexpected = [n for n in reader.names() if n not in expected and not ignorable_hf_name(n, cfg)]
    if unexpected:
        raise ConversionError(f"{reader.folder}: {len(unexpected)} weight tensors have no place in the megatron model, "
                              f"e.g. {unexpected[:5]}; the checkpoint does not match its config.json")
    dtypes = set()
    for name, shape in expected.items():
        info = reader.info(name)
        check_shape(name, shape, info.shape, where=str(reader.folder / info.file))
        dtypes.add(info.dtype)
    embed = reader.info("model.embed_tokens.weight").dtype
    if len(dtypes) > 1:
        log.warning("HF weights mix dtypes %s; converting all to %s", sorted(map(str, dtypes)), embed)
    return embed


def _import_state_dict(rules: list[TensorRule], d: Dims, padded: int, dtype: torch.dtype, reader: HFWeightReader,
                       ShardedTensor: Any) -> tuple[dict[str, Any], dict[tuple[str, tuple[int, ...]], tuple[Callable[[], torch.Tensor], int]]]:
    """Meta-device ShardedTensors for every (tensor, layer) and the functions that produce their data."""
    sharded: dict[str, Any] = {}
    producers: dict[tuple[str, tuple[int, ...]], tuple[Callable[[], torch.Tensor], int]] = {}
    for rule in rules:
        shape = megatron_shape(rule, d, padded)
        for layer in layer_indices(rule, d):
            placeholder = torch.empty(shape, dtype=dtype, device="meta")
            if rule.layered:
                sh = ShardedTensor.from_rank_offsets(rule.megatron_key, placeholder, (0, layer, d.layers),
                                                     replica_id=0, prepend_axis_num=1)
            else:
                sh = ShardedTensor.from_rank_offsets(rule.megatron_key, placeholder, replica_id=0)
            names = rule.hf_for_layer(layer)

            def produce(rule: TensorRule = rule, names: list[str] = names) -> torch.Tensor:
                return to_megatron(rule, [reader.get(n).to(dtype) for n in names], d, padded)

            sharded[f"{rule.megatron_key}#{layer}"] = sh
            producers[(sh.key, tuple(sh.global_offset))] = (produce, len(names))
    return sharded, producers


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True, file=sys.stderr)
