"""A streaming ``torch_dist`` save strategy: megatron-core's save, with tensors produced one at a time.

Design decisions:
- Writing goes through ``megatron.core.dist_checkpointing.save`` (its check that every tensor is covered
  exactly once, the common state, ``metadata.json``) with this strategy. megatron-core's own ``torch_dist``
  writer stages *every* tensor in memory before writing and forks writer processes; this one hands PyTorch
  DCP a lazy tensor subclass implementing DCP's ``_Checkpointable`` protocol, and DCP's ``FileSystemWriter``
  resolves and writes one chunk at a time (one file per chunk when streaming, since the writer keeps a
  file's tensors alive until it is closed). The on-disk format is plain ``torch_dist`` v1.
- Works with megatron-core 0.16 and >= 0.19: the strategy subclasses the public
  ``TorchDistSaveShardedStrategy`` (0.19 removed ``strategies.base`` and replaces any other strategy by its
  default), and writes sharded objects as megatron does (the ``torch.save`` bytes of the list of their data
  under the object's unique key): 0.19 stores the common state that way instead of in ``common.pt``.
- megatron-core is imported only when a strategy is built, so importing this module stays cheap.
"""
from __future__ import annotations

import functools
import io
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from caopd_megatron.checkpointing.hf.safetensors_io import ConversionError

Materialize = Callable[[Any], torch.Tensor]  # meta-device ShardedTensor -> its data


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
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(c.offsets), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                                                      properties=TensorProperties(dtype=self._dtype),
                                                      size=self._global_shape))
                for i, c in enumerate(self._chunks)]

    def __create_chunk_list__(self) -> list[Any]:
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


def _lazy_state_dict(sharded: list[Any], materialize: Optional[Materialize]) -> dict[str, Any]:
    """DCP state dict of this rank's main replicas: ``_LazyShards`` per tensor key, ``[data, ...]`` per object."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    tensors: dict[str, list[Any]] = defaultdict(list)
    objects: dict[str, list[Any]] = defaultdict(list)
    for sh in sharded:
        if isinstance(sh, ShardedObject):
            if _is_main_replica(sh.replica_id):
                objects[sh.unique_key].append(sh.data)
            continue
        if not isinstance(sh, ShardedTensor):
            raise ConversionError(f"cannot save {type(sh).__name__} entries")
        if sh.flattened_range is not None:
            raise ConversionError(f"{sh.key}: flattened (distributed-optimizer) shards are not supported here")
        if _is_main_replica(sh.replica_id):
            tensors[sh.key].append(sh)
    state: dict[str, Any] = {}
    for unique_key, data in objects.items():
        # Serialised here, as megatron-core does (DCP would drop an empty container such as [{}]).
        state[unique_key] = io.BytesIO()
        torch.save(data, state[unique_key])
    for key, shards in tensors.items():
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
    return state


class _PreSerializedSavePlanner(DefaultSavePlanner):
    """DCP's default planner, except that ``BytesIO`` values are written as they are (already serialised)."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)


@functools.cache
def _strategy_class() -> type:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class StreamingTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def __init__(self, materialize: Optional[Materialize], one_file_per_chunk: bool) -> None:
            super().__init__("torch_dist", 1)
            self.materialize = materialize
            self.one_file_per_chunk = one_file_per_chunk

        @property
        def can_handle_sharded_objects(self) -> bool:
            return True

        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            state = _lazy_state_dict(list(nested_values(sharded_state_dict)), self.materialize)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=not self.one_file_per_chunk,
                                      thread_count=1, sync_files=True)
            dcp.save(state, storage_writer=writer, planner=_PreSerializedSavePlanner(flatten_state_dict=False))

        def async_save(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the streaming strategy saves synchronously")

    return StreamingTorchDistSaveStrategy


def streaming_save_strategy(materialize: Optional[Materialize], one_file_per_chunk: bool) -> Any:
    """A megatron ``TorchDistSaveShardedStrategy`` (backend ``torch_dist`` v1) writing through DCP's FileSystemWriter.

    ``materialize(sharded_tensor)`` produces the data of meta-device entries (streaming import).
    ``one_file_per_chunk``: DCP's writer keeps every tensor of a file alive until the file is closed, so
    streaming needs one file per chunk; a model save (tensors already in memory) uses one file per rank.
    """
    return _strategy_class()(materialize, one_file_per_chunk)


@contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo world of one for the duration of a conversion, unless torch.distributed is already set up."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
