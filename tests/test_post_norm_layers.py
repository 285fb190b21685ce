"""Checks the OLMo-3 layer pieces (post-sublayer norms, QK norm over the whole projection, sliding windows).

References: transformers' ``Olmo3ForCausalLM`` for the numerics (``test_hf_conversion.py``: logits, greedy
tokens, round trip), and here
- the window masks against hand-written cases;
- the QK norm under TP=2 (two gloo processes) against the single-process model from the same checkpoint:
  logits and the gradients of every parameter (the TP reduction's backward included);
- one distillation step on an OLMo-style student and teacher (padded micro-batches) against the per-example
  unpadded reference gradient, and the weights it writes;
- the refusals: config keys that contradict each other, the TE spec / FP8 with any of the three features,
  a TP size that splits a key/value head, per-layer-type RoPE parameters that differ (YaRN on the
  full-attention layers aside: imported as transformers reads it), YaRN keys that contradict.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from helpers_models import REAL_VOCAB, runtime, tiny_model  # noqa: F401  (runtime is a fixture)
from test_batching_and_step import PAD, make_examples, reference_grads
from test_hf_conversion import REAL_VOCAB as HF_REAL_VOCAB
from test_hf_conversion import TOKENS, build_from_checkpoint, build_hf_model, save_hf

OLMO_SWITCHES = dict(qk_layernorm=True, qk_norm_scope="projection", norm_placement="post", sliding_window=3,
                     layer_types=["sliding_attention", "full_attention"])


# ---------------------------------------------------------------------------------------------- window masks
def test_sliding_causal_mask_hand_case():
    from caopd_megatron.models.kv_cache_attention import sliding_causal_mask

    got = sliding_causal_mask(4, 4, 2, "cpu")
    visible = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]  # itself and one token back
    assert torch.equal(~got, torch.tensor(visible, dtype=torch.bool))
    # Two new queries after three cached keys: positions 3 and 4.
    assert torch.equal(~sliding_causal_mask(2, 5, 2, "cpu"), torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]).bool())


def test_outside_window_of_a_slot_cache_prefix_mask():
    from caopd_megatron.models.kv_cache_attention import outside_window_of_prefix

    # Rows at positions 0, 2 and 4 over 6 cached positions (True = masked, as SlotKVCache.plan builds it).
    positions = torch.tensor([0, 2, 4])
    masked = torch.arange(6).view(1, -1) > positions.view(-1, 1)
    out = outside_window_of_prefix(masked, 3)
    assert torch.equal(out, torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool())
    assert not outside_window_of_prefix(masked, 10).any()  # a window longer than the cache hides nothing


# ---------------------------------------------------------------------------------------------- config keys
@pytest.mark.parametrize("changes, message", [
    (dict(sliding_window=0), "sliding_window must be >= 1"),
    (dict(num_layers=3, layer_types=["full_attention"] * 2), "layer_types has 2 entries; model.num_layers=3"),
    (dict(num_layers=1, layer_types=["local"], sliding_window=4), "'local' is not one of"),
    (dict(num_layers=1, layer_types=["sliding_attention"]), "sliding_window is not set"),
])
def test_model_config_refuses_contradicting_keys(changes, message):
    from caopd_megatron.config.schema import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig(**changes)


def test_config_file_keys_are_typed_and_checked(tmp_path):
    from caopd_megatron.config.loader import ConfigError, load_config

    cfg = load_config(overrides=["model.norm_placement=post", "model.qk_layernorm=true",
                                 "model.qk_norm_scope=projection", "model.sliding_window=4",
                                 "model.num_layers=2", "model.layer_types=[sliding_attention,full_attention]"])
    assert cfg.model.sliding_layers() == [True, False]
    with pytest.raises(ConfigError, match="norm_placement.*'sandwich' is not one of"):
        load_config(overrides=["model.norm_placement=sandwich"])
    with pytest.raises(ConfigError, match="sliding_window is not set"):
        load_config(overrides=["model.num_layers=1", "model.layer_types=[sliding_attention]"])


@pytest.mark.parametrize("switch, key", [(dict(norm_placement="post"), "norm_placement"),
                                         (dict(qk_layernorm=True, qk_norm_scope="projection"), "qk_norm_scope"),
                                         (dict(sliding_window=8), "sliding_window")])
def test_transformer_engine_and_fp8_refuse_the_local_only_layers(switch, key):
    from caopd_megatron.config.schema import ModelConfig
    from caopd_megatron.models.builder import ModelConfigError, use_transformer_engine
    from caopd_megatron.runtime.backend import Backend

    te = Backend(device="cuda", megatron_version="0.16", transformer_engine=True, apex=False)
    with pytest.raises(ModelConfigError, match=f"transformer_impl=transformer_engine.*{key}.*local layer spec only"):
        use_transformer_engine(ModelConfig(transformer_impl="transformer_engine", **switch), te)
    with pytest.raises(ModelConfigError, match=f"model.fp8=e4m3.*{key}"):
        use_transformer_engine(ModelConfig(fp8="e4m3", **switch), te)
    assert use_transformer_engine(ModelConfig(**switch), te) is False  # auto: the local spec
    assert use_transformer_engine(ModelConfig(), te) is True


def test_projection_qk_norm_refuses_a_tp_size_that_splits_a_kv_head():
    from caopd_megatron.config.schema import ModelConfig, ParallelConfig
    from caopd_megatron.models.builder import ModelConfigError, transformer_config
    from caopd_megatron.runtime.backend import Backend

    cpu = Backend(device="cpu", megatron_version="0.16", transformer_engine=False, apex=False)
    model = ModelConfig(num_query_groups=2, qk_layernorm=True, qk_norm_scope="projection")
    with pytest.raises(ModelConfigError, match="tensor_model_parallel_size=4 to divide the key/value heads \\(2\\)"):
        transformer_config(model, ParallelConfig(tensor_model_parallel_size=4), cpu)


def test_olmo3_rope_must_agree_across_layer_types():
    from caopd_megatron.checkpointing.hf import UnsupportedArchitectureError, hf_config_to_model_config
    from caopd_megatron.config.schema import ModelConfig

    hf = dict(architectures=["Olmo3ForCausalLM"], model_type="olmo3", hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96, vocab_size=300, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)
    default = {"rope_type": "default", "rope_theta": 500000.0}
    cfg, family = hf_config_to_model_config({**hf, "rope_parameters": {"full_attention": default,
                                                                       "sliding_attention": default}})
    assert (family.architecture, cfg.rotary_base, cfg.rope_scaling) == ("Olmo3ForCausalLM", 500000.0, False)
    assert cfg.sliding_layers() == [True, False] and cfg.norm_placement == "post"
    # The released long-context checkpoints: YaRN on the full-attention layers only (legacy spelling);
    # transformers' defaults for the betas and the attention factor.
    yarn = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192}
    cfg, _ = hf_config_to_model_config({**hf, "rope_theta": 500000.0, "rope_scaling": yarn})
    assert (cfg.yarn_factor, cfg.yarn_original_max_position_embeddings, cfg.rotary_base) == (8.0, 8192, 500000.0)
    assert (cfg.yarn_beta_fast, cfg.yarn_beta_slow, cfg.yarn_attention_factor) == (32.0, 1.0, None)
    # DeepSeek-style mscale pair: the factor transformers derives is recorded explicitly.
    cfg, _ = hf_config_to_model_config({**hf, "rope_parameters": {
        "full_attention": {**yarn, "rope_theta": 500000.0, "mscale": 1.0, "mscale_all_dim": 0.5},
        "sliding_attention": default}})
    assert cfg.yarn_attention_factor == pytest.approx((0.1 * math.log(8) + 1) / (0.05 * math.log(8) + 1))
    # YaRN on the sliding layers, and other RoPE types, stay refused in one line.
    with pytest.raises(UnsupportedArchitectureError, match="RoPE type 'yarn' is not supported here"):
        hf_config_to_model_config({**hf, "rope_parameters": {"full_attention": default,
                                                             "sliding_attention": {**yarn, "rope_theta": 500000.0}}})
    with pytest.raises(UnsupportedArchitectureError, match="RoPE type 'longrope' is not supported here"):
        hf_config_to_model_config({**hf, "rope_parameters": {"full_attention": {**default, "rope_type": "longrope"},
                                                             "sliding_attention": default}})
    with pytest.raises(UnsupportedArchitectureError, match="truncate=false"):
        hf_config_to_model_config({**hf, "rope_scaling": {**yarn, "truncate": False}})
    with pytest.raises(ValueError, match="yarn_factor and model.rope_scaling"):
        ModelConfig(yarn_factor=4.0, rope_scaling=True)
    with pytest.raises(ValueError, match="model.yarn_beta_slow must be > 0"):
        ModelConfig(yarn_factor=4.0, yarn_beta_slow=0.0)
    other = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(UnsupportedArchitectureError, match="different RoPE per layer type.*one RoPE to every layer"):
        hf_config_to_model_config({**hf, "rope_parameters": {"full_attention": default, "sliding_attention": other}})
    # No RoPE keys at all: transformers' OLMo-3 default theta, not Llama's 10000.
    import transformers

    expected = transformers.Olmo3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert hf_config_to_model_config(hf)[0].rotary_base == expected.rope_parameters["full_attention"]["rope_theta"]
    # Every layer full: only the full-attention parameters matter.
    cfg, _ = hf_config_to_model_config({**hf, "layer_types": ["full_attention"] * 2,
                                        "rope_parameters": {"full_attention": default, "sliding_attention": other}})
    assert cfg.sliding_window is None and not any(cfg.sliding_layers())


# ---------------------------------------------------------------------------------------------- training
def test_distill_step_trains_the_post_norm_layer(runtime):  # noqa: F811
    """One SGD step through ``distill_step`` (padded micro-batches of 3) writes w0 - lr * g, g the gradient of
    the per-example unpadded reference loss; the new weights (post norms, projection QK norms) learn."""
    import caopd_megatron.distill.step as step
    from caopd_megatron.config.schema import DistillConfig

    teacher, _ = tiny_model(seed=22, init_method_std=0.1, **OLMO_SWITCHES)
    examples = make_examples()
    assert max(len(e.teacher_prompt_ids) + len(e.response_ids) for e in examples) > 2 * OLMO_SWITCHES["sliding_window"]
    ref_loss, ref_grads = reference_grads(tiny_model(seed=21, init_method_std=0.1, **OLMO_SWITCHES)[0], teacher, examples)
    for name in ("post_self_attn_layernorm", "post_mlp_layernorm", "q_layernorm", "k_layernorm"):
        grads = [g for n, g in ref_grads.items() if name in n]
        assert len(grads) == 2 and all(float(g.abs().max()) > 1e-6 for g in grads), name

    student, _ = tiny_model(seed=21, init_method_std=0.1, **OLMO_SWITCHES)
    w0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    stats = step.distill_step(student, teacher, opt, None, examples, DistillConfig(micro_batch_size=3, grad_clip=0.0),
                              pad_id=PAD, real_vocab_size=REAL_VOCAB)
    assert stats.loss == pytest.approx(ref_loss, rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.detach().double(), w0[n].double() - 0.5 * ref_grads[n], rtol=1e-4, atol=1e-6,
                                   msg=n)


# ---------------------------------------------------------------------------------------------- TP = 2


def _forward_backward(model):
    """Logits ``[b, s, V]`` (gathered over TP) and every parameter's gradient of a fixed weighted logit sum."""
    positions = torch.arange(TOKENS.size(1)).unsqueeze(0).expand_as(TOKENS)
    logits = model(TOKENS, positions, attention_mask=None, runtime_gather_output=True)[..., :HF_REAL_VOCAB]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _tp2_worker(rank, world_size, ckpt):
    from caopd_megatron.config.schema import ParallelConfig
    from caopd_megatron.runtime import distributed
    from caopd_megatron.runtime.backend import detect_backend
    detect_backend()
    distributed.initialize(ParallelConfig(tensor_model_parallel_size=2), seed=0)
    results = {}
    for sp in (False, True):
        model = build_from_checkpoint(Path(ckpt), tp=2, sequence_parallel=sp)[0]
        # finalize_model_grads sums a weight's gradient over TP under SP exactly when it carries this marker.
        marked = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
        replicated_norms = {n for n, _ in model.named_parameters() if "layernorm" in n and "self_attention" not in n}
        assert marked == (replicated_norms if sp else set()), marked ^ replicated_norms
        results[sp] = _forward_backward(model)
    return results


@pytest.fixture(scope="module")
def olmo3_checkpoint(tmp_path_factory, runtime):  # noqa: F811
    from caopd_megatron.checkpointing.hf import import_hf_checkpoint

    root = tmp_path_factory.mktemp("olmo3")
    hf_dir = save_hf(build_hf_model("olmo3"), root / "hf", None)
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "olmo3"
    return Path(import_hf_checkpoint(hf_dir, root / "ckpt", show_progress=False).out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_logits_and_gradients_equal_the_single_process(olmo3_checkpoint, tp2_results, sequence_parallel):
    """TP = 2 (and TP = 2 with sequence parallelism) on two gloo ranks vs one process, same checkpoint."""
    logits, grads = _forward_backward(build_from_checkpoint(olmo3_checkpoint)[0])
    ranks = [result[sequence_parallel] for result in tp2_results]
    for tp_logits, _ in ranks:
        assert (tp_logits - logits).abs().max().item() <= 1e-5
    checked = 0
    for name, grad in grads.items():
        if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):  # TP-sharded on dim 0: halves in order
            tp_grad = torch.cat([r[1][name] for r in ranks])
        elif "layernorm" in name and sequence_parallel:  # replicated, each rank saw half the tokens: summed
            tp_grad = ranks[0][1][name] + ranks[1][1][name]  # (megatron's finalize_model_grads does this sum)
        elif "layernorm" in name:  # post norms and the final norm: replicated over TP
            tp_grad = ranks[0][1][name]
            torch.testing.assert_close(ranks[1][1][name], tp_grad, rtol=0, atol=0)
        else:
            continue
        torch.testing.assert_close(tp_grad, grad, rtol=1e-4, atol=1e-5, msg=name)
        checked += 1
    assert checked == 4 * 4 + 1


@pytest.fixture(scope="module")
def tp2_results(olmo3_checkpoint):
    """Per rank of a TP = 2 run: {sequence_parallel: (logits, gradients)}."""
    return run_distributed(_tp2_worker, 2, str(olmo3_checkpoint), timeout=300)
