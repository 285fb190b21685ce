"""Build Llama-style megatron-core ``GPTModel``s (student or teacher) from a ``ModelConfig``.

Design decisions:
- One builder for every family the project serves: RMSNorm, SwiGLU (gated linear unit with SiLU), RoPE
  (optionally Llama-3 scaled), GQA, optional QKV bias (Qwen2) and QK norm (Qwen3), tied or untied
  embeddings. The converters in ``checkpointing/hf`` map HF configs onto the same ``ModelConfig``.
- OLMo-2/3 variations are ``ModelConfig`` switches built from our local spec pieces
  (``models/local_layers.py``): post-sublayer norms (``norm_placement=post``), QK norm over the whole
  projection reduced over TP (``qk_norm_scope=projection``), and sliding-window layers (``sliding_window``,
  ``layer_types``; megatron's ``window_size`` / ``window_attn_skip_freq`` carry them to our core attention,
  ``models/kv_cache_attention.py``). TE's spec has none of them: with ``transformer_impl=auto`` such a model
  takes the local spec, with ``transformer_engine`` (or FP8, which needs TE) it is refused by name. YaRN on
  the full-attention layers (``yarn_*``, ``models/rope.py``) is a parameter of our self-attention (any spec).
- Layer spec: Transformer Engine's when TE is usable (and asked for or ``auto``), megatron-core's local
  spec otherwise, self-attention as ``models.kv_cache_attention.SlotCachedSelfAttention`` (megatron's, plus
  the rollout cache's rotate-once path); ``transformer_impl=transformer_engine`` without a usable TE is an
  error, not a silent fallback. FP8 requires TE (``models/fp8.py`` maps the ``model.fp8*`` keys). Sequence
  parallelism on the local spec swaps its norms for ``models.local_layers.SequenceParallelRMSNorm``
  (megatron's local norm refuses it); its row-parallel linears are ``GroupedRowParallelLinear`` (the TP
  group passed explicitly).
- The padded vocabulary is a multiple of ``make_vocab_size_divisible_by * TP`` (megatron-LM's rule), so
  each TP rank holds an equal shard; the real size is kept so losses and sampling ignore padded rows.
- Fusions that need CUDA kernels (bias-dropout, masked softmax, RoPE, gradient-accumulation) are off on
  CPU; the masked-softmax fusion also needs megatron's compiled extension (NVIDIA's containers have it, pip's
  megatron-core does not). Dropout is 0 (distillation fine-tuning of a pretrained model does not use it).
- Layout-invariant seeded initialisation. megatron's CPU initialisation draws each tensor's full master
  weight and keeps this TP rank's slice, so TP splits the single-process weights, except that (a) the
  vocabulary is padded per TP size (128 rows at TP=1, 256 at TP=2 for the demo), so the embedding draws more
  numbers and every later tensor comes from another part of the RNG stream, and (b) a pipeline stage draws
  only its own layers, from an RNG that has not seen the earlier stages' draws. In either case each rank
  also builds the full-depth stack once (its TP shard, PP = 1, the single-process vocabulary padding) from
  the same RNG state, copies its stage's tensors by global name (re-splitting the vocabulary rows), and
  leaves the RNG where a single process would. A seeded job then starts from the single-process weights in
  every TP/PP layout. Above ``FULL_DEPTH_INIT_LIMIT`` parameters per rank this is skipped with a warning
  (such models are loaded from checkpoints, not trained from a random start).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

import torch
import torch.nn.functional as F

from caopd_megatron.config.schema import ModelConfig, ParallelConfig, ParamsDtype
from caopd_megatron.models.fp8 import cuda_capability, fp8_transformer_kwargs
from caopd_megatron.models.rope import model_yarn_rope
from caopd_megatron.parallel.state import copy_from_full_depth
from caopd_megatron.runtime.backend import Backend, BackendError, fused_softmax_kernels_present

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

log = logging.getLogger(__name__)

# ``model.params_dtype`` names -> torch dtypes (the names are the schema's ``ParamsDtype``).
DTYPES = {name: getattr(torch, name) for name in get_args(ParamsDtype)}

# Largest full-depth TP shard (in parameters) built to give a PP stage the single-process initial weights.
FULL_DEPTH_INIT_LIMIT = 2_000_000_000


class ModelConfigError(ValueError):
    """The model configuration cannot be built; the message names the field."""


def padded_vocab_size(real_vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Smallest multiple of ``divisible_by * tp_size`` that holds ``real_vocab_size`` entries."""
    multiple = max(1, divisible_by) * tp_size
    return int(math.ceil(real_vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class VocabInfo:
    real: int  # entries that are real tokens
    padded: int  # rows of the embedding / output layer (all TP shards together)


def resolve_vocab(model: ModelConfig, tokenizer_vocab_size: int, tp_size: int) -> VocabInfo:
    real = model.vocab_size or tokenizer_vocab_size
    if real < tokenizer_vocab_size:
        raise ModelConfigError(f"model.vocab_size={real} is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size})")
    return VocabInfo(real=real, padded=padded_vocab_size(real, model.make_vocab_size_divisible_by, tp_size))


def local_only_features(model: ModelConfig) -> list[str]:
    """The model's switches that only the local layer spec builds (``model.<key>=<value>``)."""
    features = []
    if model.norm_placement == "post":
        features.append("model.norm_placement=post")
    if model.qk_norm_over_projection():
        features.append("model.qk_norm_scope=projection")
    if any(model.sliding_layers()):
        features.append(f"model.sliding_window={model.sliding_window}")
    return features


def use_transformer_engine(model: ModelConfig, backend: Backend) -> bool:
    local_only = local_only_features(model)
    if local_only and (model.transformer_impl == "transformer_engine" or model.fp8 is not None):
        asked = "model.transformer_impl=transformer_engine" if model.fp8 is None else f"model.fp8={model.fp8}"
        raise ModelConfigError(f"{asked} needs Transformer Engine's layers, which do not build {', '.join(local_only)} "
                               "(local layer spec only); use model.transformer_impl=auto or local without FP8")
    if local_only:
        return False
    if model.transformer_impl == "transformer_engine" and not backend.transformer_engine:
        raise BackendError("model.transformer_impl=transformer_engine but Transformer Engine is not usable here "
                           "(no CUDA or TE not installed); use model.transformer_impl=auto or local")
    return model.transformer_impl != "local" and backend.transformer_engine


def transformer_config(model: ModelConfig, parallel: ParallelConfig, backend: Backend):
    """megatron-core ``TransformerConfig`` for this model under this parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        log.info("parallel.sequence_parallel: TP=1, no sequence to split; off")
    if model.hidden_size % model.num_attention_heads and model.kv_channels is None:
        raise ModelConfigError(f"model.hidden_size={model.hidden_size} is not divisible by "
                               f"model.num_attention_heads={model.num_attention_heads}; set model.kv_channels")
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % groups:
        raise ModelConfigError(f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
                               f"model.num_query_groups={groups}")
    if model.qk_norm_over_projection() and groups % parallel.tensor_model_parallel_size:
        raise ModelConfigError(f"model.qk_norm_scope=projection needs parallel.tensor_model_parallel_size="
                               f"{parallel.tensor_model_parallel_size} to divide the key/value heads ({groups})")
    on_gpu = backend.device == "cuda"
    dtype = DTYPES[model.params_dtype]
    sliding = model.sliding_layers()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        # (window - 1 tokens back, 0 ahead) on the layers marked 1; honoured by our core attention.
        window_size=(model.sliding_window - 1, 0) if any(sliding) else None,
        window_attn_skip_freq=[int(s) for s in sliding] if any(sliding) else None,
        init_method_std=model.init_method_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and fused_softmax_kernels_present(),
        persist_layer_norm=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **fp8_transformer_kwargs(model, parallel.pipeline_model_parallel_size, backend.transformer_engine,
                                 cuda_capability()),
        # Our losses arrive weighted by their share of the global batch: megatron's schedules must not divide
        # them by the micro-batch count, nor DDP pre-scale gradients by 1/DP (distill/schedule.py).
        calculate_per_token_loss=True,
    )


def layer_spec(model: ModelConfig, backend: Backend, config):
    """The decoder spec: TE's layer spec, or megatron's local layer spec with ``GroupedRowParallelLinear``
    projections and (sequence-parallel) a block spec whose norms are ``SequenceParallelRMSNorm`` (megatron's
    local norm refuses sequence parallelism)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from caopd_megatron.models.kv_cache_attention import GroupedSlotAttention, SlotCachedSelfAttention
    from caopd_megatron.models.local_layers import (
        GroupedRowParallelLinear,
        ProjectionQKNormSelfAttention,
        SequenceParallelRMSNorm,
        post_norm_layer_spec,
    )

    te = use_transformer_engine(model, backend)
    projection_qk_norm = model.qk_norm_over_projection()
    per_head_qk_norm = model.qk_layernorm and not projection_qk_norm
    if te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=per_head_qk_norm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=per_head_qk_norm, normalization="RMSNorm")
    # megatron's classes with the rollout cache's path (rotated keys cached; GQA without repeated heads).
    attention = spec.submodules.self_attention
    attention.module = ProjectionQKNormSelfAttention if projection_qk_norm else SlotCachedSelfAttention
    yarn = model_yarn_rope(model)
    if yarn is not None:  # the full-attention layers' own RoPE (the model's table stays plain RoPE)
        attention.params = {**attention.params, "yarn": yarn}
    if te:
        return spec
    if model.norm_placement == "post":
        spec = post_norm_layer_spec(spec)
    layer = spec.submodules
    layer.self_attention.submodules.core_attention = GroupedSlotAttention
    # megatron-core 0.16 holds the MLP as a ModuleSpec, newer releases as a partial with its submodules keyword.
    mlp = layer.mlp.submodules if hasattr(layer.mlp, "submodules") else layer.mlp.keywords["submodules"]
    layer.self_attention.submodules.linear_proj = mlp.linear_fc2 = GroupedRowParallelLinear
    if not config.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if model.norm_placement == "pre":
        layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelRMSNorm
    if per_head_qk_norm:
        attention = layer.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, vocab: VocabInfo, backend: Backend,
                    groups: ProcessGroupCollection, pre_process: bool | None = None,
                    post_process: bool | None = None):
    """The GPTModel stage owned by this rank (all of it without pipeline parallelism), built over ``groups``
    (the job's process groups, ``runtime.distributed.process_groups``; kept as the model's ``pg_collection``).

    Parameters live on this rank's TP shard; the output layer holds ``[padded/tp, h]`` of the vocabulary.
    """
    from megatron.core.models.gpt import GPTModel

    whole_stage_default = pre_process is None and post_process is None
    if pre_process is None:
        pre_process = groups.pp.rank() == 0
    if post_process is None:
        post_process = groups.pp.rank() == groups.pp.size() - 1
    cfg = transformer_config(model, parallel, backend)
    rng_before = torch.get_rng_state()
    gpt = GPTModel(
        config=cfg,
        transformer_layer_spec=layer_spec(model, backend, cfg),
        vocab_size=vocab.padded,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=model.rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
        pg_collection=groups,
    )
    tp = parallel.tensor_model_parallel_size
    single_vocab = VocabInfo(vocab.real, padded_vocab_size(vocab.real, model.make_vocab_size_divisible_by, 1))
    differs = parallel.pipeline_model_parallel_size > 1 or single_vocab.padded != vocab.padded
    if differs and cfg.use_cpu_initialization and whole_stage_default:
        if single_vocab.padded % tp:
            log.warning("TP=%d does not divide the single-process padded vocabulary (%d): the random start differs "
                        "from a single process's", tp, single_vocab.padded)
        else:
            _single_process_init(gpt, model, parallel, single_vocab, backend, groups, rng_before)
    if backend.device == "cuda":
        gpt = gpt.cuda()
    return gpt


def _single_process_init(stage, model: ModelConfig, parallel: ParallelConfig, vocab: VocabInfo, backend: Backend,
                         groups: ProcessGroupCollection, rng_before: torch.Tensor) -> None:
    """Give this stage the weights a single process seeded like this one would have drawn (``vocab``: the
    single-process padding)."""
    from dataclasses import replace


    full_size = count_parameters(stage) * parallel.pipeline_model_parallel_size
    if full_size > FULL_DEPTH_INIT_LIMIT:
        log.warning("PP=%d: skipping the layout-invariant initialisation (~%d parameters per TP rank); the random "
                    "start differs from a single process's (load a checkpoint to start from known weights)",
                    parallel.pipeline_model_parallel_size, full_size)
        return
    torch.set_rng_state(rng_before)
    full = build_gpt_model(model, replace(parallel, pipeline_model_parallel_size=1), vocab, backend, groups,
                           pre_process=True, post_process=True)
    copy_from_full_depth(stage, full)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
