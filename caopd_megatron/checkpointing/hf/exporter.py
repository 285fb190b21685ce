"""Megatron checkpoint directory -> Hugging Face model folder (config, safetensors shards, tokenizer).

Design decisions:
- The exporter reads the distributed checkpoint itself, without a model, a process group or
  megatron-core's loader: DCP's ``.metadata`` (unpickled with the allow-list of ``checkpointing.safe_pickle``) says which
  chunks of which file hold each global tensor, and each needed chunk is read with
  ``torch.load(weights_only=True)`` from its byte range. So a checkpoint written under any TP/PP layout
  (one chunk per TP rank, per layer, or per SwiGLU half) exports the same way, from one process.
- Streaming: tensors are produced in HF file order, one megatron tensor of one layer at a time, split into
  its HF tensors (q/k/v, gate/up), cast to the chosen dtype and streamed into safetensors shards whose
  headers were written from the plan. ``torch.load`` reads each chunk straight from its byte range, and a
  chunk that is exactly the wanted region is used as is, so peak memory is one layer's tensor plus the
  chunk being copied (measured: +151 MiB exporting a 938 MiB model whose largest tensor is 125 MiB).
- Everything is checked before the first byte is written: each stored tensor exists and has the global
  shape the model config implies (the error names the tensor and both shapes); the vocabulary rows are
  at least the real vocabulary. Padded vocabulary rows are dropped.
- ``config.json`` is written from the ``ModelConfig`` (the truth for the weights), with token ids from the
  imported model's config when there is one, else from the checkpoint's tokenizer. When transformers is
  importable, the written config is read back with ``AutoConfig`` and its RoPE, sliding window and shapes are
  compared with the model config, so an export transformers would misread fails here instead of producing a
  subtly different model.
- The architecture is the recorded source one (or ``architecture=``), else inferred from the switches (a
  window on every layer makes Llama's switches Mistral); the summary says which and why.
- The output folder must be new or empty (``overwrite=True`` replaces it): a half-old, half-new folder is
  never produced.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from caopd_megatron.checkpointing.hf.adapter import (
    Dims,
    Family,
    ShapeMismatchError,
    check_family_matches,
    check_padded_vocab,
    family_by_name,
    hf_shapes,
    infer_family,
    layer_indices,
    megatron_global_shape,
    model_config_to_hf_config,
    olmo3_rope_parameters,
    tensor_rules,
    to_hf,
)
from caopd_megatron.checkpointing.hf.checkpoint_dir import (
    DTYPES,
    HF_SOURCE_DIR,
    TOKENIZER_DIR,
    check_checkpoint_safe,
    copy_tokenizer_files,
    load_model_config,
    prepare_out_dir,
    read_checkpoint_info,
)
from caopd_megatron.checkpointing.hf.safetensors_io import (
    CheckpointFileError,
    ConversionError,
    PlannedTensor,
    StreamingSafetensorsWriter,
    read_json,
)
from caopd_megatron.runtime.progress import progress_bar


@dataclass
class ExportSummary:
    out_dir: str
    architecture: str
    tensors_written: int
    bytes_written: int
    dtype: str
    files: list[str] = field(default_factory=list)
    tokenizer_files: list[str] = field(default_factory=list)
    vocab_rows_dropped: int = 0  # padded rows removed from the embedding (and the untied head)
    seconds: float = 0.0
    architecture_from: str = ""  # why this architecture: requested, the imported model's, or inferred

    def describe(self) -> str:
        tok = ", ".join(self.tokenizer_files) if self.tokenizer_files else "none (the checkpoint has no tokenizer/)"
        return (f"exported {self.architecture} ({self.architecture_from}) -> {self.out_dir}\n"
                f"  {self.tensors_written} tensors, {self.bytes_written / 2**20:.1f} MiB ({self.dtype}) in "
                f"{self.seconds:.1f}s; {self.vocab_rows_dropped} padded vocabulary rows dropped per vocabulary tensor\n"
                f"  files: {', '.join(self.files)}\n"
                f"  tokenizer files: {tok}")


class _ByteWindow(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``start`` of an open file (one DCP chunk record)."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        super().__init__()
        self._f, self._start, self._length, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + offset), self._length)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class DistCheckpointReader:
    """Region reads from a megatron-core ``torch_dist`` checkpoint, chunk by chunk, with no process group."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        self.metadata = check_checkpoint_safe(self.dir)

    def shape(self, key: str) -> Optional[tuple[int, ...]]:
        md = self.metadata.state_dict_metadata.get(key)
        return tuple(md.size) if md is not None and hasattr(md, "size") else None

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of a stored global tensor, from the chunks overlapping it."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self.metadata.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "chunks"):
            raise CheckpointFileError(f"{self.dir}: tensor {key!r} is not in the checkpoint")
        overlapping = []
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + cs) for o, s, c, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if all(a < b for a, b in zip(lo, hi)):
                overlapping.append((chunk, lo, hi))
        if len(overlapping) == 1 and tuple(overlapping[0][0].offsets) == tuple(offsets) \
                and tuple(overlapping[0][0].sizes) == tuple(sizes):
            # One stored chunk is exactly the region (TP=1 checkpoints, imports): no assembly copy.
            chunk = overlapping[0][0]
            return self._load_chunk(key, MetadataIndex(key, torch.Size(chunk.offsets)), tuple(chunk.sizes))
        out = torch.empty(sizes, dtype=md.properties.dtype)
        covered = 0
        for chunk, lo, hi in overlapping:
            data = self._load_chunk(key, MetadataIndex(key, torch.Size(chunk.offsets)), tuple(chunk.sizes))
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))] = \
                data[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))]
            covered += int(torch.Size([b - a for a, b in zip(lo, hi)]).numel())
            del data
        if covered != out.numel():  # DCP never stores overlapping chunks, so this means a hole
            raise CheckpointFileError(f"{self.dir}: the stored chunks of {key} do not cover {list(offsets)} + {list(sizes)}")
        return out

    def _load_chunk(self, key: str, index: Any, sizes: tuple[int, ...]) -> torch.Tensor:
        info = self.metadata.storage_data.get(index)
        if info is None:
            raise CheckpointFileError(f"{self.dir}: no storage entry for {key} at {list(index.offset)}")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointFileError(f"{self.dir}: {key} is stored with transforms {info.transform_descriptors}, "
                                      "which this reader does not support")
        path = self.dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(0, io.SEEK_END)
                if f.tell() < info.offset + info.length:
                    raise EOFError(f"the file has {f.tell()} bytes, the chunk ends at {info.offset + info.length}")
                # torch.load reads the chunk's zip record straight from the file: no extra copy of its bytes.
                data = torch.load(_ByteWindow(f, info.offset, info.length), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointFileError(f"{path}: cannot read {key} at {list(index.offset)} ({exc})") from None
        if not isinstance(data, torch.Tensor) or tuple(data.shape) != sizes:
            got = list(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
            raise CheckpointFileError(f"{path}: chunk of {key} is {got}, the metadata says {list(sizes)}")
        return data


def export_hf_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
                         architecture: Optional[str] = None, max_shard_size: int | str = "5GB",
                         show_progress: bool = True, overwrite: bool = False) -> ExportSummary:
    """Write an HF model folder for a checkpoint directory (any TP/PP layout it was saved under).

    ``architecture`` overrides the recorded source architecture (or the one inferred from the model config
    for checkpoints trained from scratch); ``dtype`` is the dtype of the written weights.
    """
    start = time.time()
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise CheckpointFileError(f"checkpoint directory not found: {ckpt}")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype]
    info = read_checkpoint_info(ckpt)
    cfg = load_model_config(ckpt)
    cfg.vocab_size = info.real_vocab_size
    family, architecture_from = _family(architecture, info.source_architecture, cfg)
    d = Dims.of(cfg)
    rules = tensor_rules(cfg, family)
    reader = DistCheckpointReader(ckpt)

    # Validate every stored tensor against the config before writing anything.
    padded_rows: dict[str, int] = {}
    for rule in rules:
        stored = reader.shape(rule.megatron_key)
        if stored is None:
            raise CheckpointFileError(f"{ckpt}: tensor {rule.megatron_key!r} is missing from the checkpoint")
        expected = megatron_global_shape(rule, d, stored[0] if rule.kind == "vocab" else 0)
        if stored != expected:
            raise ShapeMismatchError(f"shape mismatch for {rule.megatron_key}: checkpoint {list(stored)}, "
                                     f"model config implies {list(expected)}")
        if rule.kind == "vocab":
            check_padded_vocab(d.vocab, stored[0])
            padded_rows[rule.megatron_key] = stored[0]

    plan = [PlannedTensor(name, shape, out_dtype)
            for rule in rules for layer in layer_indices(rule, d)
            for name, shape in zip(rule.hf_for_layer(layer), hf_shapes(rule, d))]
    out = Path(out_dir)
    prepare_out_dir(out, overwrite, markers=("config.json", "model.safetensors", "model.safetensors.index.json"))
    writer = StreamingSafetensorsWriter(out, plan, max_shard_size)
    bar = progress_bar(len(plan), f"export {family.architecture}", unit="tensor", enabled=show_progress)
    try:
        for rule in rules:
            global_shape = reader.shape(rule.megatron_key)
            assert global_shape is not None
            for layer in layer_indices(rule, d):
                if rule.layered:
                    region = reader.read(rule.megatron_key, (layer, *[0] * (len(global_shape) - 1)),
                                         (1, *global_shape[1:]))[0]
                else:
                    region = reader.read(rule.megatron_key, (0,) * len(global_shape), global_shape)
                for name, tensor in zip(rule.hf_for_layer(layer), to_hf(rule, region, d)):
                    writer.write(name, tensor.to(out_dtype).contiguous())
                    if bar is not None:
                        bar.set_postfix_str(name, refresh=False)
                        bar.update(1)
                del region
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()

    source = _read_optional_json(ckpt / HF_SOURCE_DIR / "config.json")
    token_ids = _tokenizer_ids(ckpt / TOKENIZER_DIR)
    hf_config = model_config_to_hf_config(cfg, family, dtype=dtype, source=source, token_ids=token_ids)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    gen = _read_optional_json(ckpt / HF_SOURCE_DIR / "generation_config.json") or {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    tok_files = copy_tokenizer_files(ckpt / TOKENIZER_DIR, out)
    _verify_with_transformers(out, cfg, family)
    return ExportSummary(out_dir=str(out), architecture=family.architecture, architecture_from=architecture_from,
                         tensors_written=len(plan),
                         bytes_written=writer.bytes_written, dtype=dtype,
                         files=files + ["config.json", "generation_config.json"], tokenizer_files=tok_files,
                         vocab_rows_dropped=max(padded_rows.values()) - d.vocab,
                         seconds=time.time() - start)


def _family(requested: Optional[str], recorded: Optional[str], cfg: Any) -> tuple[Family, str]:
    """The export family, checked against the model config before anything is written, and why it is that one."""
    if requested or recorded:
        family = family_by_name(requested or recorded)
        reason = "requested" if requested else "the imported model's architecture"
    else:
        family = infer_family(cfg)
        reason = "inferred from the model config's switches"
        if family.window_on_every_layer and cfg.sliding_window is not None:
            reason += f" with sliding_window={cfg.sliding_window} on every layer"
    check_family_matches(family, cfg)
    return family, reason


def _read_optional_json(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    data = read_json(path, path.name)
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path}: expected a JSON object")
    return data


def _tokenizer_ids(folder: Path) -> dict[str, Any]:
    """bos/eos/pad ids from the checkpoint's tokenizer (for checkpoints without an HF source config)."""
    if not (folder / "tokenizer.json").is_file():
        return {}
    try:
        from caopd_megatron.data.tokenizer import TextTokenizer

        tok = TextTokenizer.from_file(folder)
    except Exception:  # a tokenizer the project cannot read still travels; ids then stay unset
        return {}
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def _verify_with_transformers(out: Path, cfg: Any, family: Family) -> None:
    """Read the written config back with transformers (when installed) and compare what decides the weights."""
    try:
        from transformers import AutoConfig
    except Exception:
        return
    hf = AutoConfig.from_pretrained(str(out), local_files_only=True)
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    per_layer_type = {kind: params for kind, params in rope.items() if isinstance(params, dict)}  # OLMo-3
    checks = {}
    if per_layer_type:  # every parameter written per layer type, as transformers reads it back
        written = olmo3_rope_parameters(cfg)
        for kind, params in written.items():
            for key, value in params.items():
                checks[f"rope_parameters[{kind}][{key}]"] = (per_layer_type.get(kind, {}).get(key), value)
    else:
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
        checks["rope_theta"] = (float(theta) if theta is not None else None, float(cfg.rotary_base))
        checks["rope_type"] = (rope.get("rope_type", rope.get("type", "default")),
                               "llama3" if cfg.rope_scaling else "default")
    if family.sliding_layers and any(cfg.sliding_layers()):
        checks["layer_types"] = (list(getattr(hf, "layer_types", None) or []),
                                 ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers()])
    if any(cfg.sliding_layers()) or family.window_on_every_layer:  # Mistral: None = no window (its default is 4096)
        checks["sliding_window"] = (getattr(hf, "sliding_window", None), cfg.sliding_window)
    checks.update({
        "num_hidden_layers": (hf.num_hidden_layers, cfg.num_layers),
        "num_key_value_heads": (hf.num_key_value_heads, cfg.num_query_groups or cfg.num_attention_heads),
        "vocab_size": (hf.vocab_size, cfg.vocab_size),
        "tie_word_embeddings": (bool(getattr(hf, "tie_word_embeddings", False)), cfg.tie_embeddings),
    })
    wrong = {k: v for k, v in checks.items() if v[0] != v[1]}
    if wrong:
        raise ConversionError(f"{out}/config.json is read by transformers differently from the model config "
                              f"(read, expected): {wrong}")


__all__ = ["DistCheckpointReader", "ExportSummary", "export_hf_checkpoint"]
