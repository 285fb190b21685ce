"""Per-family mapping between Hugging Face causal LMs and megatron-core ``GPTModel`` checkpoints.

One module holds everything family-specific (in the spirit of torchtitan's state-dict adapters): which
architectures are supported, how an HF ``config.json`` becomes the project's ``ModelConfig`` and back, and
how every HF tensor name and layout maps onto a megatron-core distributed-checkpoint key and layout.

Design decisions:
- Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` (the Llama layout under its own config keys:
  ``sliding_window`` on every layer, no bias switches), ``Qwen2ForCausalLM`` (QKV bias),
  ``Qwen3ForCausalLM`` (per-head QK RMSNorm) and ``Olmo3ForCausalLM`` (post-sublayer norms, QK RMSNorm over
  the whole projection, sliding-window layers). A ``Family`` is the ``ModelConfig`` switches it fixes; the
  rest is shared. A Mistral ``sliding_window`` shorter than ``max_position_embeddings`` imports as
  ``ModelConfig.sliding_window`` with no ``layer_types`` (every layer slides, as transformers' Mistral
  does); null or at least the context is full attention. Mistral ``layer_types`` (transformers ignores
  them) are refused unless they agree with that. Export picks Mistral for Llama switches with every layer
  sliding and Llama for window-free ones; an imported model keeps its recorded architecture. Anything else
  is refused by name with the supported list, and so is any config switch the megatron model built by
  ``models/builder.py`` cannot reproduce (o_proj/MLP biases, sliding windows outside Mistral and OLMo-3,
  non-SiLU activations, partial rotary, RoPE types other than default and llama3
  (and yarn on OLMo-3's full-attention layers), OLMo-3 RoPE parameters that otherwise differ between layer
  types) - a silently different model is worse than an error.
- OLMo-3 names: HF's ``post_attention_layernorm`` is a real post-attention norm there (in Llama it is the
  pre-MLP norm), so it maps to ``post_self_attn_layernorm``; its q/k norm weights are ``[heads * head_dim]``
  / ``[kv_heads * head_dim]`` in HF's head order, which is megatron's, so they copy unchanged (TP shards are
  contiguous runs of heads). RoPE is one parameter set per layer type there: the released long-context
  checkpoints put YaRN on the full-attention layers only (``model.yarn_*``, ``models/rope.py``); export
  writes YaRN for that type (attention factor explicit) and the base RoPE for the sliding one.
- Keys are megatron-core's *distributed-checkpoint* keys (``decoder.layers.self_attention.linear_qkv.weight``
  with a leading layer axis of size ``num_layers``), not module names. These keys are layout-free: a
  tensor's global shape does not depend on TP or PP, which is why one checkpoint loads under any layout.
  The local (CPU) layer spec maps its norms to the Transformer Engine names (``input_layernorm`` ->
  ``linear_qkv.layer_norm_weight``), so the same keys serve both specs.
- Layouts (global tensors):
  * ``linear_qkv``: rows grouped by query group: for each KV group g, the ``heads/groups`` query heads
    of g, then k_g, then v_g (each ``kv_channels`` rows). TP shards are contiguous runs of groups.
    HF's GQA pairs query head h with KV head ``h // (heads/groups)``, which is exactly this grouping.
    Biases follow the same row order.
  * ``linear_fc1``: ``[gate; up]`` stacked on rows (megatron's SwiGLU factory shards each half over TP).
  * ``linear_proj`` / ``linear_fc2``: HF ``o_proj`` / ``down_proj`` unchanged (row-parallel on dim 1).
  * Embedding / output layer: HF rows then zero rows up to the padded vocabulary; export drops them.
- RoPE: megatron-core 0.16's Llama-3 scaling hard-codes ``low_freq_factor=1``, ``high_freq_factor=4`` and
  ``original_max_position_embeddings=8192`` (``RotaryEmbedding._apply_scaling``; only ``factor`` is a
  parameter). HF configs with other values are refused rather than converted into a different model.
  ``rotary_base`` is passed to megatron as an int, so a non-integer ``rope_theta`` is refused too.
- HF config parsing accepts both spellings: transformers 5 ``rope_parameters`` and the older
  ``rope_theta`` + ``rope_scaling``; an omitted llama3 ``original_max_position_embeddings`` defaults to
  ``max_position_embeddings`` as transformers does. Export writes both spellings so transformers 4.45+
  and 5.x read the same RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, get_args

import torch

from caopd_megatron.checkpointing.hf.checkpoint_dir import installed_megatron_core_version
from caopd_megatron.checkpointing.hf.safetensors_io import ConversionError
from caopd_megatron.config.schema import LayerType, ModelConfig, ParamsDtype
from caopd_megatron.models.rope import default_attention_factor, model_yarn_rope

# megatron-core 0.16 ``RotaryEmbedding._apply_scaling`` constants (only ``factor`` is configurable there).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DEFAULT_CONTEXT = 2048  # max_position_embeddings of an HF config that names none


class UnsupportedArchitectureError(ConversionError):
    """The HF architecture or one of its config switches cannot be represented; the message says which."""


class ShapeMismatchError(ConversionError):
    """A tensor's shape differs from what the config implies; the message names the tensor and both shapes."""


@dataclass(frozen=True)
class Family:
    architecture: str  # HF ``architectures[0]``
    model_type: str  # HF ``model_type``
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on q and k before RoPE (Qwen3 per head, OLMo-3 over the whole projection)
    qk_norm_scope: str = "head"  # ModelConfig.qk_norm_scope
    norm_placement: str = "pre"  # ModelConfig.norm_placement (post: OLMo-3)
    sliding_layers: bool = False  # per-layer sliding-window attention (``layer_types``, OLMo-3)
    window_on_every_layer: bool = False  # one ``sliding_window`` for all layers, no ``layer_types`` (Mistral)
    default_rope_theta: float = 10000.0  # what transformers assumes when the config names no rope_theta

    def switches(self) -> dict[str, Any]:
        """The ``ModelConfig`` switches this family fixes."""
        return {"add_qkv_bias": self.qkv_bias, "qk_layernorm": self.qk_norm, "qk_norm_scope": self.qk_norm_scope,
                "norm_placement": self.norm_placement}


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LlamaForCausalLM", "llama", qkv_bias=False, qk_norm=False),
    "MistralForCausalLM": Family("MistralForCausalLM", "mistral", qkv_bias=False, qk_norm=False,
                                 window_on_every_layer=True),
    "Qwen2ForCausalLM": Family("Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": Family("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True),
    "Olmo3ForCausalLM": Family("Olmo3ForCausalLM", "olmo3", qkv_bias=False, qk_norm=True,
                               qk_norm_scope="projection", norm_placement="post", sliding_layers=True,
                               default_rope_theta=500000.0),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


def family_by_name(architecture: str) -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}") from None


def config_switches(model_cfg: ModelConfig) -> dict[str, Any]:
    """The family-deciding switches of a ``ModelConfig`` (the scope of an absent QK norm reads as ``head``)."""
    switches = {key: getattr(model_cfg, key) for key in FAMILIES["LlamaForCausalLM"].switches()}
    if not model_cfg.qk_layernorm:
        switches["qk_norm_scope"] = "head"
    return switches


def infer_family(model_cfg: ModelConfig) -> Family:
    """The family whose switches match a ``ModelConfig`` (for checkpoints trained without an HF source):
    Llama's switches with a sliding window are Mistral (Llama has no window; Mistral slides every layer)."""
    wanted = config_switches(model_cfg)
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Olmo3ForCausalLM"):
        if FAMILIES[name].switches() == wanted:
            if name == "LlamaForCausalLM" and any(model_cfg.sliding_layers()):
                return FAMILIES["MistralForCausalLM"]
            return FAMILIES[name]
    described = ", ".join(f"{key}={value}" for key, value in wanted.items())
    raise UnsupportedArchitectureError(
        f"{described} matches none of the supported architectures ({', '.join(SUPPORTED_ARCHITECTURES)})")


def check_family_matches(family: Family, model_cfg: ModelConfig) -> None:
    have = config_switches(model_cfg)
    if have != family.switches():
        expected = ", ".join(f"{key}={value}" for key, value in family.switches().items())
        found = ", ".join(f"{key}={value}" for key, value in have.items())
        raise UnsupportedArchitectureError(f"{family.architecture} needs {expected}; the model config has {found}")
    sliding = model_cfg.sliding_layers()
    if any(sliding) and not family.sliding_layers:
        if not family.window_on_every_layer:
            raise UnsupportedArchitectureError(
                f"{family.architecture} export has no sliding-window layers; the model config has "
                f"sliding_window={model_cfg.sliding_window}")
        if not all(sliding):
            raise UnsupportedArchitectureError(
                f"{family.architecture} applies sliding_window={model_cfg.sliding_window} to every layer; the "
                f"model config's layer_types mix kinds ({model_cfg.layer_types})")


# --------------------------------------------------------------------------------------------------------
# Config: HF config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------


def _rope_from_hf(hf: dict[str, Any], allow_yarn: bool = False) -> tuple[float, dict[str, Any] | None, dict[str, Any] | None]:
    """(rope_theta, llama3 scaling dict or None, ``ModelConfig`` yarn_* keys or None) from either the
    transformers-5 or the legacy spelling; YaRN only where ``allow_yarn`` (OLMo-3's full-attention layers)."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedArchitectureError("per-layer-type RoPE parameters (nested rope_parameters) are not supported")
    scaling: dict[str, Any] = {}
    theta = None
    if isinstance(params, dict):
        scaling.update(params)
        theta = params.get("rope_theta")
    if isinstance(legacy, dict):  # transformers lets rope_scaling win over rope_parameters
        scaling.update(legacy)
    if theta is None:
        theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedArchitectureError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    if rope_type in (None, "default"):
        return float(theta), None, None
    if rope_type == "yarn" and allow_yarn:
        return float(theta), None, _yarn_from_hf(scaling, hf)
    if rope_type != "llama3":
        supported = "default, llama3 (megatron-core's Llama-3 scaling)" + (", yarn" if allow_yarn else
                                                                           "; yarn on OLMo-3's full-attention layers only")
        raise UnsupportedArchitectureError(f"RoPE type {rope_type!r} is not supported here; supported: {supported}")
    llama3 = dict(scaling)
    llama3.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if llama3.get(key) is None:
            raise UnsupportedArchitectureError(f"llama3 RoPE scaling without {key!r} in the HF config")
    for key, expected in MEGATRON_LLAMA3_ROPE.items():
        if float(llama3[key]) != float(expected):
            raise UnsupportedArchitectureError(
                f"llama3 RoPE scaling with {key}={llama3[key]}: megatron-core {installed_megatron_core_version()} hard-codes "
                f"{key}={expected} (only 'factor' is configurable), so this model cannot be reproduced")
    return float(theta), llama3, None


def _yarn_from_hf(scaling: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` yarn_* keys for an HF ``rope_type="yarn"`` parameter set, read as transformers reads it
    (``factor`` defaults to max / original positions; falsy betas to 32 / 1; the attention factor is explicit,
    or a ratio of ``mscale`` / ``mscale_all_dim`` when both are set, or the default)."""
    original = scaling.get("original_max_position_embeddings")
    if original is None:
        raise UnsupportedArchitectureError("yarn RoPE scaling without 'original_max_position_embeddings' in the HF config")
    if scaling.get("truncate", True) is False:
        raise UnsupportedArchitectureError("yarn RoPE scaling with truncate=false is not supported")
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else float(_require(hf, "max_position_embeddings")) / float(original)
    attention = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention is None and mscale and mscale_all_dim:
        attention = default_attention_factor(factor, mscale) / default_attention_factor(factor, mscale_all_dim)
    return dict(yarn_factor=factor, yarn_original_max_position_embeddings=int(original),
                yarn_beta_fast=float(scaling.get("beta_fast") or 32.0),
                yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
                yarn_attention_factor=None if attention is None else float(attention))


def _rope_per_layer_type(hf: dict[str, Any], layer_kinds: set[str]) -> tuple[float, dict[str, Any] | None, dict[str, Any] | None]:
    """OLMo-3's RoPE: one parameter set per layer type (nested ``rope_parameters``; in the legacy spelling
    ``rope_scaling`` applies to the full-attention layers only, as transformers reads it). The megatron model
    has one base RoPE for every layer plus, optionally, YaRN on the full-attention layers; beyond that the
    types in use must agree."""
    params = hf.get("rope_parameters")
    per_kind, yarn = {}, None
    for kind in sorted(layer_kinds):
        if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
            own = {**hf, "rope_parameters": params.get(kind) or {"rope_type": "default"}, "rope_scaling": None}
        else:
            own = hf if kind == "full_attention" else {**hf, "rope_scaling": None}
        theta, llama3, kind_yarn = _rope_from_hf(own, allow_yarn=kind == "full_attention")
        per_kind[kind], yarn = (theta, llama3), kind_yarn or yarn
    if len(set(map(repr, per_kind.values()))) > 1:
        described = "; ".join(f"{kind}: theta={theta:g}, scaling={scaling}"
                              for kind, (theta, scaling) in per_kind.items())
        raise UnsupportedArchitectureError(
            f"different RoPE per layer type ({described}) is not supported: the megatron model applies one RoPE "
            "to every layer (YaRN on the full-attention layers aside)")
    return (*next(iter(per_kind.values())), yarn)


def _require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConversionError(f"HF config has no {key!r}")
    return hf[key]


def hf_architecture(hf: dict[str, Any]) -> Family:
    archs = hf.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(
            f"HF config names no architecture ('architectures' is empty); supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if len(archs) != 1:
        raise UnsupportedArchitectureError(f"HF config names several architectures {archs}; expected exactly one")
    return family_by_name(archs[0])


def hf_config_to_model_config(hf: dict[str, Any], make_vocab_size_divisible_by: int = 128) -> tuple[ModelConfig, Family]:
    """The project's ``ModelConfig`` for an HF ``config.json`` dict, and the family it belongs to."""
    family = hf_architecture(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(f"{family.architecture} with hidden_act={act!r}: only silu (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{family.architecture} with mlp_bias=true is not supported (megatron model has no MLP biases)")
    if family.model_type in ("llama", "qwen3", "olmo3") and hf.get("attention_bias"):
        raise UnsupportedArchitectureError(
            f"{family.architecture} with attention_bias=true is not supported: it also puts a bias on o_proj, "
            "which the megatron model does not have")
    layer_types = hf.get("layer_types")
    every_layer_window = _every_layer_window(hf, family)
    if (not family.sliding_layers and not family.window_on_every_layer
            and (hf.get("use_sliding_window") or any(t != "full_attention" for t in (layer_types or [])))):
        raise UnsupportedArchitectureError(f"{family.architecture} with sliding-window attention layers is not supported")
    if int(hf.get("pretraining_tp", 1) or 1) != 1:
        raise UnsupportedArchitectureError("pretraining_tp != 1 is not supported")

    hidden = int(_require(hf, "hidden_size"))
    heads = int(_require(hf, "num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConversionError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    hf = {"rope_theta": family.default_rope_theta, **hf}
    if family.sliding_layers:
        layer_types = list(layer_types or ["full_attention"] * int(_require(hf, "num_hidden_layers")))
        theta, llama3, yarn = _rope_per_layer_type(hf, set(layer_types))
    else:
        theta, llama3, yarn = _rope_from_hf(hf)
    if theta != int(theta):
        raise UnsupportedArchitectureError(f"rope_theta={theta} is not an integer; megatron-core takes an integer rotary_base")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    has_sliding_layers = family.sliding_layers and "sliding_attention" in layer_types
    window = int(_require(hf, "sliding_window")) if has_sliding_layers else every_layer_window
    cfg = ModelConfig(
        num_layers=int(_require(hf, "num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=int(_require(hf, "intermediate_size")),
        kv_channels=head_dim,
        vocab_size=int(_require(hf, "vocab_size")),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(hf.get("max_position_embeddings") or DEFAULT_CONTEXT),
        rotary_base=float(theta),
        rope_scaling=llama3 is not None,
        rope_scaling_factor=float(llama3["factor"]) if llama3 else ModelConfig.rope_scaling_factor,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        **family.switches(),
        **(yarn or {}),
        sliding_window=window,
        layer_types=layer_types if family.sliding_layers else None,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        params_dtype=dtype if dtype in get_args(ParamsDtype) else "float32",
    )
    return cfg, family


def _every_layer_window(hf: dict[str, Any], family: Family) -> int | None:
    """The window a family that slides every layer (Mistral) applies, or None when it attends over the whole
    context (``sliding_window`` null or at least ``max_position_embeddings``). Its ``layer_types``, which
    transformers' Mistral ignores, must name that one kind on every layer."""
    if not family.window_on_every_layer:
        return None
    window = hf.get("sliding_window")
    context = int(hf.get("max_position_embeddings") or DEFAULT_CONTEXT)
    if window is not None and int(window) < 1:
        raise UnsupportedArchitectureError(f"{family.architecture} with sliding_window={window}: a window needs >= 1 token")
    window = int(window) if window is not None and int(window) < context else None
    kind = "full_attention" if window is None else "sliding_attention"
    layer_types = hf.get("layer_types")
    if layer_types is not None and set(layer_types) != {kind}:
        raise UnsupportedArchitectureError(
            f"{family.architecture} with layer_types {sorted(set(layer_types))} is not supported: transformers' "
            f"{family.architecture} applies sliding_window={hf.get('sliding_window')} to every layer (all {kind})")
    return window


def model_rope_parameters(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The model-wide RoPE as HF writes it: (``rope_parameters``, legacy ``rope_scaling`` or None)."""
    theta = float(cfg.rotary_base)
    if not cfg.rope_scaling:
        return {"rope_type": "default", "rope_theta": theta}, None
    rope_scaling = {"rope_type": "llama3", "factor": float(cfg.rope_scaling_factor), **MEGATRON_LLAMA3_ROPE}
    return {**rope_scaling, "rope_theta": theta}, rope_scaling


def olmo3_rope_parameters(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """OLMo-3's per-layer-type ``rope_parameters`` for ``cfg``: the model-wide RoPE on both types, YaRN on
    the full-attention layers when ``cfg.yarn_factor`` is set (the attention factor written explicitly, so
    every transformers release reads the same number)."""
    per_kind = {kind: dict(model_rope_parameters(cfg)[0]) for kind in get_args(LayerType)}
    yarn = model_yarn_rope(cfg)
    if yarn is not None:
        per_kind["full_attention"] = {"rope_type": "yarn", "rope_theta": yarn.theta, "factor": yarn.factor,
                                      "original_max_position_embeddings": yarn.original_max_position_embeddings,
                                      "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
                                      "attention_factor": yarn.attention_scaling}
    return per_kind


# Non-architecture keys carried over from the source HF config on export (token ids, cache switch).
_CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


def model_config_to_hf_config(cfg: ModelConfig, family: Family, *, dtype: str,
                              source: dict[str, Any] | None = None,
                              token_ids: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg``; ``source`` (the imported model's config) supplies token ids."""
    check_family_matches(family, cfg)
    if cfg.vocab_size is None:
        raise ConversionError("the model config has no vocab_size; cannot write an HF config")
    heads = cfg.num_attention_heads
    head_dim = cfg.kv_channels or cfg.hidden_size // heads
    theta = float(cfg.rotary_base)
    rope_parameters, rope_scaling = model_rope_parameters(cfg)
    out: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.num_query_groups or heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "initializer_range": cfg.init_method_std,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers < 5 reads this spelling
        "use_cache": True,
    }
    if family.model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family.model_type == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    elif family.model_type == "mistral":
        out.update(sliding_window=cfg.sliding_window)  # check_family_matches: every layer or none
    elif family.model_type == "olmo3":
        # Nested per layer type (transformers 5); older releases read rope_theta only.
        out.update(attention_bias=False, sliding_window=cfg.sliding_window, rope_scaling=None,
                   rope_parameters=olmo3_rope_parameters(cfg),
                   layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers()])
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    for key in _CARRIED_KEYS:
        if source and key in source:
            out[key] = source[key]
    for key, value in (token_ids or {}).items():
        if value is not None and out.get(key) is None:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------
# Tensors: names, shapes and layouts
# --------------------------------------------------------------------------------------------------------

EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_KEY = "output_layer.weight"
FINAL_NORM_KEY = "decoder.final_layernorm.weight"
POST_ATTENTION_NORM_KEY = "decoder.layers.post_self_attn_layernorm.weight"  # models.local_layers.PostNormTransformerLayer
POST_MLP_NORM_KEY = "decoder.layers.post_mlp_layernorm.weight"


@dataclass(frozen=True)
class Dims:
    """The sizes the layouts need, derived once from a ``ModelConfig``."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    layers: int
    vocab: int  # real rows
    qk_norm_over_projection: bool = False  # q/k norm weights span all heads ([heads * head_dim]), not one head

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Dims":
        if cfg.vocab_size is None:
            raise ConversionError("the model config has no vocab_size (the real vocabulary size)")
        return cls(hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                   groups=cfg.num_query_groups or cfg.num_attention_heads,
                   head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
                   ffn=cfg.ffn_hidden_size or 4 * cfg.hidden_size, layers=cfg.num_layers, vocab=cfg.vocab_size,
                   qk_norm_over_projection=cfg.qk_norm_over_projection())

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


@dataclass(frozen=True)
class TensorRule:
    """One megatron tensor and the HF tensors it is made of.

    ``hf_names`` are templates with ``{i}`` for the layer index (layered rules). ``kind`` picks the layout
    transform: ``copy`` (same tensor), ``qkv`` (q, k, v interleaved by group), ``gate_up`` ([gate; up]),
    ``vocab`` (rows padded to the padded vocabulary).
    """

    megatron_key: str
    hf_names: tuple[str, ...]
    kind: str
    layered: bool

    def hf_for_layer(self, layer: int | None) -> list[str]:
        return [n.format(i=layer) for n in self.hf_names]


def tensor_rules(cfg: ModelConfig, family: Family) -> list[TensorRule]:
    """Every megatron tensor of the model, in HF file order (embedding, layers, final norm, head)."""
    check_family_matches(family, cfg)
    p = "model.layers.{i}."
    rules = [TensorRule(EMBEDDING_KEY, ("model.embed_tokens.weight",), "vocab", False)]
    post_norm = family.norm_placement == "post"
    layer = [] if post_norm else [
        TensorRule("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (p + "input_layernorm.weight",), "copy", True)]
    layer += [
        TensorRule("decoder.layers.self_attention.linear_qkv.weight",
                   (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"), "qkv", True),
    ]
    if family.qkv_bias:
        layer.append(TensorRule("decoder.layers.self_attention.linear_qkv.bias",
                                (p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"),
                                "qkv", True))
    if family.qk_norm:
        layer += [
            TensorRule("decoder.layers.self_attention.q_layernorm.weight", (p + "self_attn.q_norm.weight",), "copy", True),
            TensorRule("decoder.layers.self_attention.k_layernorm.weight", (p + "self_attn.k_norm.weight",), "copy", True),
        ]
    layer.append(TensorRule("decoder.layers.self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",), "copy", True))
    if post_norm:  # HF's post_attention_layernorm follows attention here; in Llama it is the pre-MLP norm
        layer.append(TensorRule(POST_ATTENTION_NORM_KEY, (p + "post_attention_layernorm.weight",), "copy", True))
    else:
        layer.append(TensorRule("decoder.layers.mlp.linear_fc1.layer_norm_weight", (p + "post_attention_layernorm.weight",), "copy", True))
    layer += [
        TensorRule("decoder.layers.mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "gate_up", True),
        TensorRule("decoder.layers.mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), "copy", True),
    ]
    if post_norm:
        layer.append(TensorRule(POST_MLP_NORM_KEY, (p + "post_feedforward_layernorm.weight",), "copy", True))
    rules += layer
    rules.append(TensorRule(FINAL_NORM_KEY, ("model.norm.weight",), "copy", False))
    if not cfg.tie_embeddings:
        rules.append(TensorRule(OUTPUT_KEY, ("lm_head.weight",), "vocab", False))
    return rules


def hf_shapes(rule: TensorRule, d: Dims) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``rule`` (per layer for layered rules)."""
    key, h = rule.megatron_key, d.hidden
    if rule.kind == "vocab":
        return [(d.vocab, h)]
    if rule.kind == "qkv":
        bias = key.endswith(".bias")
        q, kv = d.heads * d.head_dim, d.groups * d.head_dim
        return [(q,), (kv,), (kv,)] if bias else [(q, h), (kv, h), (kv, h)]
    if rule.kind == "gate_up":
        return [(d.ffn, h), (d.ffn, h)]
    if key.endswith("linear_proj.weight"):
        return [(h, d.heads * d.head_dim)]
    if key.endswith("linear_fc2.weight"):
        return [(h, d.ffn)]
    if key.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        if not d.qk_norm_over_projection:
            return [(d.head_dim,)]
        return [((d.heads if key.endswith("q_layernorm.weight") else d.groups) * d.head_dim,)]
    return [(h,)]  # RMSNorm weights


def megatron_shape(rule: TensorRule, d: Dims, padded_vocab: int) -> tuple[int, ...]:
    """Shape of one layer's megatron tensor (without the layer axis), or of the whole tensor if not layered."""
    if rule.kind == "vocab":
        return (padded_vocab, d.hidden)
    if rule.kind == "qkv":
        return (d.qkv_rows,) if rule.megatron_key.endswith(".bias") else (d.qkv_rows, d.hidden)
    if rule.kind == "gate_up":
        return (2 * d.ffn, d.hidden)
    return hf_shapes(rule, d)[0]


def megatron_global_shape(rule: TensorRule, d: Dims, padded_vocab: int) -> tuple[int, ...]:
    shape = megatron_shape(rule, d, padded_vocab)
    return (d.layers, *shape) if rule.layered else shape


def check_shape(name: str, expected: Sequence[int], actual: Sequence[int], where: str = "") -> None:
    if tuple(expected) != tuple(actual):
        src = f" in {where}" if where else ""
        raise ShapeMismatchError(f"shape mismatch for {name}{src}: expected {list(expected)} (from the config), "
                                 f"found {list(actual)}")


def _qkv_views(d: Dims, trailing: tuple[int, ...]) -> tuple[tuple[int, ...], list[int]]:
    return (d.groups, d.q_per_group + 2, d.head_dim, *trailing), [d.q_per_group, 1, 1]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    """HF q/k/v (weights ``[rows, h]`` or biases ``[rows]``) -> megatron ``linear_qkv`` rows grouped by KV group."""
    trailing = tuple(q.shape[1:])
    qg = q.reshape(d.groups, d.q_per_group, d.head_dim, *trailing)
    kg = k.reshape(d.groups, 1, d.head_dim, *trailing)
    vg = v.reshape(d.groups, 1, d.head_dim, *trailing)
    return torch.cat([qg, kg, vg], dim=1).reshape(d.qkv_rows, *trailing)


def split_qkv(qkv: torch.Tensor, d: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    trailing = tuple(qkv.shape[1:])
    shape, sizes = _qkv_views(d, trailing)
    q, k, v = torch.split(qkv.reshape(shape), sizes, dim=1)
    return (q.reshape(d.heads * d.head_dim, *trailing).contiguous(),
            k.reshape(d.groups * d.head_dim, *trailing).contiguous(),
            v.reshape(d.groups * d.head_dim, *trailing).contiguous())


def to_megatron(rule: TensorRule, hf_tensors: Sequence[torch.Tensor], d: Dims, padded_vocab: int) -> torch.Tensor:
    """Megatron tensor (one layer's for layered rules) from the rule's HF tensors."""
    if rule.kind == "qkv":
        return fuse_qkv(*hf_tensors, d)
    if rule.kind == "gate_up":
        return torch.cat(list(hf_tensors), dim=0)
    (t,) = hf_tensors
    if rule.kind == "vocab" and padded_vocab > t.shape[0]:
        # Padded rows are zeros: deterministic, and never read (losses and samplers mask them).
        return torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])], dim=0)
    return t


def to_hf(rule: TensorRule, tensor: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """The rule's HF tensors from its megatron tensor (one layer's for layered rules)."""
    if rule.kind == "qkv":
        return list(split_qkv(tensor, d))
    if rule.kind == "gate_up":
        gate, up = torch.split(tensor, [d.ffn, d.ffn], dim=0)
        return [gate.contiguous(), up.contiguous()]
    if rule.kind == "vocab":
        return [tensor[: d.vocab].contiguous()]
    return [tensor]


# HF tensors that carry no weights of the model (recomputed buffers): ignored on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def ignorable_hf_name(name: str, cfg: ModelConfig) -> bool:
    """Names an import may skip: RoPE buffers, and ``lm_head.weight`` of a tied model (a copy of the embedding)."""
    return name.endswith(IGNORED_HF_SUFFIXES) or (cfg.tie_embeddings and name == "lm_head.weight")


def check_padded_vocab(real: int, padded: int) -> None:
    if padded < real:
        raise ConversionError(f"padded vocabulary ({padded}) is smaller than the real vocabulary ({real})")


def layer_indices(rule: TensorRule, d: Dims) -> list[int | None]:
    return list(range(d.layers)) if rule.layered else [None]
