"""FP8 through Transformer Engine: the ``model.fp8*`` keys mapped onto megatron-core's ``TransformerConfig``.

Design decisions:
- ``fp8_transformer_kwargs`` is a pure function returning TransformerConfig keyword arguments with the names
  megatron-core 0.16 accepts (``fp8`` format, ``fp8_recipe``, ``first_last_layers_bf16`` and
  ``num_layers_at_{start,end}_in_bf16``, ``fp8_param``). It imports neither TE nor megatron, so the mapping is
  tested on machines with neither TE nor CUDA.
- Our checks come first and name our keys (megatron's asserts name its own): delayed scaling cannot keep
  layers in bf16, each bf16 count must fit one pipeline stage, ``fp8_param`` needs ``fp8``, FP8 GEMMs need
  hidden and FFN sizes that are multiples of 16, and the GPU must support the recipe.
- The teacher computes in FP8 only with ``model.fp8_teacher``, and never stores its weights in FP8: an EMA
  step (rate 0.01) is below half an FP8 ulp (e4m3 has 3 mantissa bits) and would be rounded away.
- The loss reads bf16/fp32 logits whatever this says: megatron runs FP8 only in the decoder layers' TE GEMMs;
  the final norm and the output layer (``tensor_parallel.ColumnParallelLinear``, and the fused loss's own
  matmul) are outside every FP8 context, and the loss upcasts to fp32.
- Without a usable TE, ``model.fp8`` stops the job with one line naming what to install, unless
  ``model.fp8_fallback=bf16``: then one warning, and the model runs without FP8 in its ``params_dtype``.
- Not wired yet (the call sites belong to the step): micro-batch token counts padded to a multiple of
  ``FP8_TOKEN_MULTIPLE``; ``fp8_ddp_kwargs`` into megatron's ``DistributedDataParallelConfig``.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional, Tuple

import torch

from caopd_megatron.config.schema import ModelConfig
from caopd_megatron.runtime.backend import BackendError

log = logging.getLogger(__name__)

# Transformer Engine's FP8 GEMMs need the inner dimension a multiple of 16 and the token count of 8/16.
FP8_DIM_MULTIPLE = 16
FP8_TOKEN_MULTIPLE = 16

# Oldest CUDA compute capability that runs each recipe (Ada/Hopper for per-tensor scaling, Hopper for
# blockwise, Blackwell for MXFP8).
RECIPE_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}

INSTALL_HINT = ("run in NVIDIA's PyTorch container (README, section GPU) or "
                "`pip install --no-build-isolation transformer_engine[pytorch]` on a CUDA machine")

_warned_fallback = False


class FP8ConfigError(ValueError):
    """The ``model.fp8*`` keys cannot be honoured; the message names the key."""


def cuda_capability() -> Optional[Tuple[int, int]]:
    """This process's GPU compute capability, or None without CUDA."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def teacher_model_config(model: ModelConfig) -> ModelConfig:
    """The teacher's ``ModelConfig``: FP8 compute only with ``fp8_teacher``, weights never stored in FP8."""
    return replace(model, fp8=model.fp8 if model.fp8_teacher else None, fp8_param=False)


def check_fp8_model(model: ModelConfig, pipeline_model_parallel_size: int = 1) -> None:
    """Raise ``FP8ConfigError`` for FP8 keys that megatron / TE would reject (or silently ignore)."""
    if model.fp8 is None:
        if model.fp8_param:
            raise FP8ConfigError("model.fp8_param=true needs model.fp8 (e4m3 or hybrid)")
        return
    if model.transformer_impl == "local":
        raise FP8ConfigError("model.fp8 runs in Transformer Engine layers: set model.transformer_impl=auto or "
                             "transformer_engine (local layers would ignore it)")
    start, end = model.fp8_layers_at_start_in_bf16, model.fp8_layers_at_end_in_bf16
    if start < 0 or end < 0:
        raise FP8ConfigError(f"model.fp8_layers_at_start_in_bf16={start} / model.fp8_layers_at_end_in_bf16={end} "
                             "must be >= 0")
    if (start or end) and model.fp8_recipe == "delayed":
        raise FP8ConfigError("model.fp8_layers_at_start_in_bf16 / model.fp8_layers_at_end_in_bf16 need a current-"
                             "scaling recipe: set model.fp8_recipe=tensorwise, blockwise or mxfp8 (delayed scaling "
                             "cannot keep layers in bf16)")
    per_stage = model.num_layers // max(1, pipeline_model_parallel_size)
    if start > per_stage or end > per_stage:
        raise FP8ConfigError(f"model.fp8_layers_at_start_in_bf16={start} / model.fp8_layers_at_end_in_bf16={end}: "
                             f"each must be at most the layers of one pipeline stage ({per_stage})")
    for key in ("hidden_size", "ffn_hidden_size"):
        size = getattr(model, key) or 4 * model.hidden_size
        if size % FP8_DIM_MULTIPLE:
            raise FP8ConfigError(f"model.fp8 needs model.{key} a multiple of {FP8_DIM_MULTIPLE} (FP8 GEMMs), "
                                 f"got {size}")


def check_fp8_hardware(recipe: str, capability: Optional[Tuple[int, int]]) -> None:
    """Raise ``FP8ConfigError`` when the GPU (compute ``capability``; None = no GPU) cannot run ``recipe``."""
    needed = RECIPE_MIN_CAPABILITY[recipe]
    if capability is not None and tuple(capability) < needed:
        raise FP8ConfigError(f"model.fp8_recipe={recipe} needs compute capability >= {needed[0]}.{needed[1]}; "
                             f"this GPU has {capability[0]}.{capability[1]}")


def fp8_transformer_kwargs(model: ModelConfig, pipeline_model_parallel_size: int, te_usable: bool,
                           capability: Optional[Tuple[int, int]] = None) -> dict:
    """TransformerConfig keyword arguments for ``model``'s FP8 keys (``{"fp8": None}`` when FP8 is off).

    ``te_usable``: Transformer Engine imports and CUDA is present (``Backend.transformer_engine``);
    ``capability``: the GPU's compute capability (``cuda_capability()``), None to skip the hardware check.
    """
    global _warned_fallback
    check_fp8_model(model, pipeline_model_parallel_size)
    if model.fp8 is None:
        return {"fp8": None}
    if not te_usable:
        if model.fp8_fallback != "bf16":
            raise BackendError(f"model.fp8={model.fp8} needs Transformer Engine, which is not usable here: "
                               f"{INSTALL_HINT}; or set model.fp8_fallback=bf16 to run without FP8")
        if not _warned_fallback:
            log.warning("model.fp8=%s: Transformer Engine is not usable here; model.fp8_fallback=bf16, so the model "
                        "runs without FP8 (params_dtype=%s)", model.fp8, model.params_dtype)
            _warned_fallback = True
        return {"fp8": None}
    check_fp8_hardware(model.fp8_recipe, capability)
    start, end = model.fp8_layers_at_start_in_bf16, model.fp8_layers_at_end_in_bf16
    return {
        "fp8": model.fp8,
        "fp8_recipe": model.fp8_recipe,
        "fp8_param": model.fp8_param,
        "first_last_layers_bf16": bool(start or end),
        "num_layers_at_start_in_bf16": start,
        "num_layers_at_end_in_bf16": end,
    }


def fp8_ddp_kwargs(model: ModelConfig) -> dict:
    """megatron ``DistributedDataParallelConfig`` arguments: gather FP8 weights when they are stored in FP8."""
    return {"fp8_param_gather": bool(model.fp8 and model.fp8_param)}
