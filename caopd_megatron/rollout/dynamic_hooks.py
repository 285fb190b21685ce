"""megatron-core's dynamic inference engine with its sampling step replaced by the keyed-noise draw (CUDA only).

Design decisions:
- The two supported megatron-core lines hook sampling differently: 0.16's ``TextGenerationController``
  samples in ``_dynamic_step_sample_logits(logits)`` (``KeyedController`` overrides it); 0.19's samples through
  a pluggable ``Sampling`` backend (``KeyedSampling`` is installed as the controller's ``_sampling``). Both
  hand the active requests' last-token logits ``[n, V]`` and their request ids (the context's
  ``request_ids[paused:total]``, the rows' order) to ``rollout.dynamic.KeyedDraws.draw`` and write its
  tokens where the engine reads them.
- Engines and contexts are built per call from the model's config and process groups (``build_engine_016`` /
  ``build_engine_019``, chosen by whether megatron-core has ``inference.config.InferenceConfig``); chunked
  prefill off, last-token logits only, no prefix caching (every request is prefilled: correctness first).
- The engine wants a tokenizer only to detokenize (text we do not use) and for a default EOS (we pass ours).
This module imports megatron-core's inference package at import time; ``rollout/dynamic.py`` imports it only
when the dynamic engine runs. Not exercised without CUDA (``tests/test_gpu.py``).
"""
from __future__ import annotations

import torch
from megatron.core.inference.contexts import DynamicInferenceContext
from megatron.core.inference.engines import DynamicInferenceEngine
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.sampling_params import SamplingParams as EngineSamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController

from caopd_megatron.parallel.data_parallel import model_groups, unwrap

try:  # megatron-core >= 0.19: one InferenceConfig, pluggable sampling backends
    from megatron.core.inference.config import InferenceConfig
    from megatron.core.inference.sampling.base import Sampling

    InferenceWrapperConfig = None
except ImportError:  # 0.16: the wrapper's own config, sampling inside the controller
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig

    InferenceConfig = None
    Sampling = object

KV_BUFFER_GB = 4.0  # paged KV memory the engine may take on each GPU


class IdsOnlyTokenizer:
    """What the engine asks of a tokenizer when prompts are token ids: an EOS id and a detokenizer."""

    def __init__(self, eos_id: int):
        self.eod = eos_id

    def detokenize(self, ids, *args, **kwargs) -> str:
        return ""


def active_request_ids(context) -> list[int]:
    """The request ids of the context's active rows, in the rows' order (paused requests come first)."""
    return context.request_ids[context.paused_request_count: context.total_request_count].tolist()


class KeyedController(TextGenerationController):
    """megatron-core 0.16's controller; its dynamic-batching sampling step draws with keyed noise."""

    draws = None  # a rollout.dynamic.KeyedDraws, set by build_engine_016

    def _dynamic_step_sample_logits(self, logits: torch.Tensor) -> None:
        context = self.inference_wrapped_model.inference_context
        last = logits.squeeze(0) if context.materialize_only_last_token_logits else context.last_token_logits(logits)
        ids = active_request_ids(context)
        self._sampled_tokens_cuda[: len(ids)] = self.draws.draw(last[: len(ids)], ids)


class KeyedSampling(Sampling):
    """megatron-core 0.19's sampling backend drawing with keyed noise (``sample_kernel``'s contract)."""

    def __init__(self, draws):
        self.draws = draws

    def sample_kernel(self, logits, n, context, *, no_top_k, no_top_p, gather_indices=None,
                      token_to_request_index=None, output=None, eager=False, cache_key=None):
        rows = logits[gather_indices[:n]] if gather_indices is not None else logits[:n]
        tokens = self.draws.draw(rows, active_request_ids(context)[:n])
        if output is not None:
            output.copy_(tokens)
            return output
        return tokens

    def log_probs_kernel(self, logits, context, *, token_to_request_index=None):
        return torch.log_softmax(logits.float(), dim=-1)  # the engine's own log-probs (not requested)


def build_engine_016(model, draws, max_len: int, max_requests: int) -> DynamicInferenceEngine:
    inner, groups = unwrap(model), model_groups(model)
    cfg = inner.config
    context = DynamicInferenceContext(
        params_dtype=cfg.params_dtype, num_layers=cfg.num_layers // groups.pp.size(),
        kv_channels=cfg.kv_channels, num_attention_heads=cfg.num_query_groups or cfg.num_attention_heads,
        max_sequence_length=max_len, buffer_size_gb=KV_BUFFER_GB, max_requests=max_requests,
        tensor_model_parallel_size=groups.tp.size(), pipeline_model_parallel_size=groups.pp.size(),
        pg_collection=groups, materialize_only_last_token_logits=True)
    wrapper_config = InferenceWrapperConfig(
        hidden_size=cfg.hidden_size, params_dtype=cfg.params_dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=inner.vocab_size, inference_max_requests=max_requests, inference_max_seq_length=max_len)
    wrapper = GPTInferenceWrapper(model, wrapper_config, context, pg_collection=groups)
    controller = KeyedController(wrapper, IdsOnlyTokenizer(draws.eos_id), pp_group=groups.pp)
    controller.draws = draws
    return DynamicInferenceEngine(controller, context, random_seed=draws.params.seed, enable_chunked_prefill=False,
                                  pg_collection=groups)


def build_engine_019(model, draws, max_len: int, max_requests: int) -> DynamicInferenceEngine:
    inner = unwrap(model)
    config = InferenceConfig(max_sequence_length=max_len, buffer_size_gb=KV_BUFFER_GB, max_requests=max_requests,
                             pg_collection=model_groups(model), materialize_only_last_token_logits=True,
                             enable_chunked_prefill=False, enable_prefix_caching=False)
    context = DynamicInferenceContext(inner.config, config)
    controller = TextGenerationController(GPTInferenceWrapper(model, context), IdsOnlyTokenizer(draws.eos_id))
    controller._sampling = KeyedSampling(draws)
    return DynamicInferenceEngine(controller, context)


def run_dynamic_engine(model, draws, max_len: int, max_requests: int) -> None:
    """Every request of ``draws`` (a ``rollout.dynamic.KeyedDraws``) through a fresh dynamic engine."""
    build = build_engine_016 if InferenceConfig is None else build_engine_019
    engine = build(model, draws, max_len, max_requests)
    params = EngineSamplingParams(temperature=max(draws.params.temperature, 1e-6), top_k=draws.params.top_k,
                                  top_p=0.0 if draws.params.top_p >= 1 else draws.params.top_p,
                                  num_tokens_to_generate=draws.params.max_new_tokens, termination_id=draws.eos_id)
    for request_id, request in draws.requests.items():
        engine.add_request(request_id, list(request.prompt), params)
    while engine.has_unfinished_requests():
        engine.step_modern()
