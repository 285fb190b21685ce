"""Hugging Face <-> megatron-core checkpoint conversion and the project's Megatron checkpoint directories.

Design decisions:
- The logic lives here; ``tools/import_hf.py`` and ``tools/export_hf.py`` are thin command lines over
  ``import_hf_checkpoint`` and ``export_hf_checkpoint``.
- ``adapter`` holds everything family-specific (names, layouts, configs); ``safetensors_io`` streams HF
  weight files; ``checkpoint_dir`` owns the checkpoint directory's format (info, model config, tokenizer);
  ``streaming_save`` is the megatron save strategy that writes tensors one at a time; ``model_weights``
  saves/loads a GPTModel's weights (``save_megatron_checkpoint``, ``load_megatron_checkpoint``); ``importer``
  converts HF -> checkpoint and ``exporter`` checkpoint -> HF. The restricted unpickler every load runs
  first lives in ``checkpointing.safe_pickle``.
- Imports are light: megatron-core and transformers are imported inside the functions that need them,
  so ``from caopd_megatron.checkpointing.hf import load_megatron_checkpoint`` costs nothing extra.
"""
from caopd_megatron.checkpointing.hf.adapter import (
    SUPPORTED_ARCHITECTURES,
    ShapeMismatchError,
    UnsupportedArchitectureError,
    hf_config_to_model_config,
    model_config_to_hf_config,
)
from caopd_megatron.checkpointing.hf.checkpoint_dir import CheckpointInfo, load_model_config, read_checkpoint_info
from caopd_megatron.checkpointing.hf.exporter import ExportSummary, export_hf_checkpoint
from caopd_megatron.checkpointing.hf.importer import ImportSummary, import_hf_checkpoint
from caopd_megatron.checkpointing.hf.model_weights import load_megatron_checkpoint, save_megatron_checkpoint
from caopd_megatron.checkpointing.hf.safetensors_io import CheckpointFileError, ConversionError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointFileError",
    "CheckpointInfo",
    "ConversionError",
    "ExportSummary",
    "ImportSummary",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
    "export_hf_checkpoint",
    "hf_config_to_model_config",
    "import_hf_checkpoint",
    "load_megatron_checkpoint",
    "load_model_config",
    "model_config_to_hf_config",
    "read_checkpoint_info",
    "save_megatron_checkpoint",
]
