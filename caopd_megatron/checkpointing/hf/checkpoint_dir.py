"""The project's Megatron checkpoint directory: what it holds, and reading/writing everything but the weights.

A checkpoint directory holds:

- a megatron-core distributed checkpoint (``torch_dist`` backend: ``metadata.json``, ``.metadata``,
  ``*.distcp`` files and, with megatron-core < 0.19, ``common.pt``), loadable with
  ``megatron.core.dist_checkpointing.load`` (written and read by ``model_weights`` and ``importer``);
- ``model_config.yaml``: the project's ``ModelConfig`` (``vocab_size`` = the real vocabulary);
- ``caopd_checkpoint.json``: format version, real and padded vocabulary sizes, source architecture, dtype;
- ``tokenizer/``: the tokenizer files, and ``hf_source/``: the imported model's ``config.json`` and
  ``generation_config.json`` (token ids and generation defaults for a later export).

Design decisions:
- Paths inside the stored config are re-derived from where the directory is now (it can be moved).
- An output directory is replaced only on request and only if it looks like an earlier output.
- No pickled code on load: ``check_checkpoint_safe`` runs the restricted readers of
  ``checkpointing.safe_pickle`` before megatron-core or PyTorch DCP unpickle anything.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from caopd_megatron.checkpointing.hf.safetensors_io import CheckpointFileError, ConversionError, read_json
from caopd_megatron.checkpointing.safe_pickle import UnsafeCheckpointError, verify_distributed_checkpoint
from caopd_megatron.config.loader import ConfigError, load_section, to_yaml
from caopd_megatron.config.schema import ModelConfig
from caopd_megatron.models.builder import DTYPES

FORMAT_NAME = "caopd-megatron-checkpoint"
FORMAT_VERSION = 1
INFO_FILE = "caopd_checkpoint.json"
MODEL_CONFIG_FILE = "model_config.yaml"
TOKENIZER_DIR = "tokenizer"
HF_SOURCE_DIR = "hf_source"
HF_SOURCE_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


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
    path.write_text(to_yaml(cfg), encoding="utf-8")


def load_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ``ModelConfig`` stored in a checkpoint, with ``tokenizer`` and ``checkpoint`` pointing at this directory.

    Paths are re-derived from where the directory is now, so a checkpoint can be moved or copied.
    """
    ckpt = Path(ckpt_dir)
    path = ckpt / MODEL_CONFIG_FILE
    if not path.is_file():
        raise CheckpointFileError(f"model config not found: {path}")
    try:
        cfg: ModelConfig = load_section(ModelConfig, path)
    except ConfigError as exc:
        raise CheckpointFileError(f"not a valid model config ({exc})") from None
    tok = ckpt / TOKENIZER_DIR
    cfg.tokenizer = str(tok.resolve()) if (tok / "tokenizer.json").is_file() else None
    cfg.checkpoint = str(ckpt.resolve())
    return cfg


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` that exist into ``dst``; return their names."""
    return _copy_existing(src, dst, TOKENIZER_FILES)


def copy_hf_source(src: Path, dst: Path) -> list[str]:
    """Copy the HF ``config.json``/``generation_config.json`` of ``src`` that exist into ``dst``; return their names."""
    return _copy_existing(src, dst, HF_SOURCE_FILES)


def _copy_existing(src: Path, dst: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def prepare_out_dir(out: Path, overwrite: bool, markers: tuple[str, ...] = (INFO_FILE, "metadata.json")) -> None:
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


def check_checkpoint_safe(ckpt_dir: str | Path) -> Any:
    """Verify the pickled parts of a distributed checkpoint hold no code; return its DCP metadata."""
    try:
        return verify_distributed_checkpoint(ckpt_dir)
    except UnsafeCheckpointError as exc:
        raise CheckpointFileError(str(exc)) from None


def installed_megatron_core_version() -> str:
    """The installed megatron-core's version, read from the package metadata (no megatron import)."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
