"""Checks ``models/fp8.py``: the ``model.fp8*`` keys mapped onto megatron-core's ``TransformerConfig``, on CPU and
without Transformer Engine.

References: megatron-core itself. The kwargs build a real ``TransformerConfig`` (its ``__post_init__`` validates
them), the recipe names are members of megatron's ``Fp8Recipe``, and megatron's ``is_first_last_bf16_layer``
says which layers run in bf16; hand-written expected dicts; torch's ``float8_e4m3fn`` for the EMA rationale.
One test maps and builds the config in an interpreter where importing Transformer Engine fails.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from caopd_megatron.config.loader import ConfigError, load_config
from caopd_megatron.config.schema import ModelConfig
from caopd_megatron.models import fp8 as fp8_module
from caopd_megatron.models.fp8 import (FP8ConfigError, check_fp8_hardware, fp8_ddp_kwargs, fp8_transformer_kwargs,
                                       teacher_model_config)
from caopd_megatron.runtime.backend import BackendError
from helpers_models import runtime, tiny_model  # noqa: F401  (runtime is a fixture)

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

SIX_LAYERS = dict(num_layers=6, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, params_dtype="bfloat16")


def megatron_config(model: ModelConfig, pp: int = 1, **kwargs):
    """A real megatron-core TransformerConfig with the FP8 kwargs (its __post_init__ validates them)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=model.num_layers, hidden_size=model.hidden_size,
                             num_attention_heads=model.num_attention_heads, ffn_hidden_size=model.ffn_hidden_size,
                             bf16=True, params_dtype=torch.bfloat16, pipeline_model_parallel_size=pp,
                             pipeline_dtype=torch.bfloat16, **kwargs)


# Run in a fresh interpreter where ``import transformer_engine`` raises: the mapping and megatron's config must
# not need it (meaningful where TE is installed, e.g. NVIDIA's container).
WITHOUT_TE = """
import sys, warnings
sys.modules["transformer_engine"] = None
warnings.filterwarnings("ignore")
import torch
from caopd_megatron.config.schema import ModelConfig
from caopd_megatron.models.fp8 import fp8_transformer_kwargs
from megatron.core.transformer.transformer_config import TransformerConfig
model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, fp8="hybrid",
                    fp8_recipe="blockwise", fp8_layers_at_end_in_bf16=1, fp8_param=True)
kw = fp8_transformer_kwargs(model, 1, te_usable=True)
cfg = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, bf16=True,
                        params_dtype=torch.bfloat16, **kw)
assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_param, cfg.num_layers_at_end_in_bf16) == ("hybrid", "blockwise", True, 1)
print("mapped without transformer_engine")
"""


def test_fp8_off_maps_to_none_and_builds():
    kw = fp8_transformer_kwargs(ModelConfig(**SIX_LAYERS), 1, te_usable=False)
    assert kw == {"fp8": None}
    assert megatron_config(ModelConfig(**SIX_LAYERS), **kw).fp8 is None


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
@pytest.mark.parametrize("fmt", ["e4m3", "hybrid"])
def test_every_format_and_recipe_is_a_name_megatron_accepts(fmt, recipe):
    from megatron.core.enums import Fp8Recipe

    model = ModelConfig(**SIX_LAYERS, fp8=fmt, fp8_recipe=recipe)
    kw = fp8_transformer_kwargs(model, 1, te_usable=True)
    assert kw == {"fp8": fmt, "fp8_recipe": recipe, "fp8_param": False, "first_last_layers_bf16": False,
                  "num_layers_at_start_in_bf16": 0, "num_layers_at_end_in_bf16": 0}
    cfg = megatron_config(model, **kw)
    assert cfg.fp8 == fmt and Fp8Recipe(cfg.fp8_recipe) == Fp8Recipe(recipe)


@pytest.mark.parametrize("start,end,pp,expected", [
    (1, 2, 1, [True, False, False, False, True, True]),
    (0, 1, 1, [False, False, False, False, False, True]),
    (2, 0, 2, [True, True, False, False, False, False]),  # global layer index: PP stages do not change it
])
def test_first_and_last_layers_in_bf16_as_megatron_reads_them(start, end, pp, expected):
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    model = ModelConfig(**SIX_LAYERS, fp8="hybrid", fp8_recipe="tensorwise", fp8_layers_at_start_in_bf16=start,
                        fp8_layers_at_end_in_bf16=end)
    kw = fp8_transformer_kwargs(model, pp, te_usable=True)
    assert kw["first_last_layers_bf16"] is True
    cfg = megatron_config(model, pp=pp, **kw)
    assert [is_first_last_bf16_layer(cfg, layer) for layer in range(6)] == expected


def test_mapping_needs_no_transformer_engine():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mapped without transformer_engine" in done.stdout


def test_fp8_param_maps_to_weights_and_ddp_gather():
    model = ModelConfig(**SIX_LAYERS, fp8="e4m3", fp8_param=True)
    assert megatron_config(model, **fp8_transformer_kwargs(model, 1, te_usable=True)).fp8_param is True
    assert fp8_ddp_kwargs(model) == {"fp8_param_gather": True}
    assert fp8_ddp_kwargs(ModelConfig(**SIX_LAYERS)) == {"fp8_param_gather": False}


@pytest.mark.parametrize("overrides,match", [
    (dict(fp8="e4m3", fp8_layers_at_start_in_bf16=1), "need a current-scaling recipe"),  # delayed is the default
    (dict(fp8="e4m3", fp8_recipe="tensorwise", fp8_layers_at_end_in_bf16=4), "at most the layers of one pipeline"),
    (dict(fp8="e4m3", fp8_recipe="tensorwise", fp8_layers_at_start_in_bf16=-1), "must be >= 0"),
    (dict(fp8_param=True), "fp8_param=true needs model.fp8"),
    (dict(fp8="e4m3", hidden_size=72, num_attention_heads=4), "model.hidden_size a multiple of 16"),
    (dict(fp8="e4m3", ffn_hidden_size=100), "model.ffn_hidden_size a multiple of 16"),
    (dict(fp8="e4m3", transformer_impl="local"), "transformer_impl=auto"),
])
def test_bad_fp8_keys_fail_with_our_key_names(overrides, match):
    model = ModelConfig(**{**SIX_LAYERS, **overrides})
    with pytest.raises(FP8ConfigError, match=match):
        fp8_transformer_kwargs(model, 2, te_usable=True)


def test_megatron_rejects_what_we_reject_first():
    """Our delayed-scaling check mirrors a megatron rule (so ours only improves the message)."""
    with pytest.raises(ValueError, match="Delayed scaling does not support"):
        megatron_config(ModelConfig(**SIX_LAYERS), fp8="e4m3", fp8_recipe="delayed", first_last_layers_bf16=True)


def test_hardware_check_per_recipe():
    check_fp8_hardware("mxfp8", (10, 0))
    check_fp8_hardware("blockwise", (9, 0))
    check_fp8_hardware("tensorwise", (8, 9))
    check_fp8_hardware("mxfp8", None)  # no GPU: nothing to check
    with pytest.raises(FP8ConfigError, match=r"mxfp8 needs compute capability >= 10.0; this GPU has 9.0"):
        check_fp8_hardware("mxfp8", (9, 0))
    with pytest.raises(FP8ConfigError, match="delayed needs compute capability >= 8.9"):
        check_fp8_hardware("delayed", (8, 0))
    model = ModelConfig(**SIX_LAYERS, fp8="e4m3", fp8_recipe="mxfp8")
    with pytest.raises(FP8ConfigError, match="mxfp8"):
        fp8_transformer_kwargs(model, 1, te_usable=True, capability=(9, 0))  # an H100/H200


def test_teacher_runs_fp8_only_on_request_and_never_stores_fp8_weights():
    student = ModelConfig(**SIX_LAYERS, fp8="hybrid", fp8_param=True)
    teacher = teacher_model_config(student)
    assert teacher.fp8 is None and teacher.fp8_param is False
    assert teacher.hidden_size == student.hidden_size  # nothing else changes
    fp8_teacher = teacher_model_config(ModelConfig(**SIX_LAYERS, fp8="hybrid", fp8_param=True, fp8_teacher=True))
    assert fp8_teacher.fp8 == "hybrid" and fp8_teacher.fp8_param is False
    assert fp8_transformer_kwargs(teacher, 1, te_usable=True) == {"fp8": None}


def test_ema_update_below_fp8_resolution_is_lost():
    """Why the teacher's weights stay high precision: a rate-0.01 EMA step rounds away in e4m3."""
    teacher = torch.full((4,), 1.0)
    student = torch.full((4,), 1.5)
    step = torch.lerp(teacher, student, 0.01)  # 1.005
    assert torch.all(step.to(torch.float8_e4m3fn).float() == teacher)
    assert torch.all(step.to(torch.bfloat16).float() == 1.0078125)  # bf16 (ulp 2^-7 at 1) keeps a step


def test_without_te_fp8_is_a_one_line_error_naming_the_install():
    model = ModelConfig(**SIX_LAYERS, fp8="e4m3")
    with pytest.raises(BackendError) as info:
        fp8_transformer_kwargs(model, 1, te_usable=False)
    message = str(info.value)
    assert "\n" not in message
    assert "transformer_engine[pytorch]" in message and "model.fp8_fallback=bf16" in message


def test_bf16_fallback_warns_once_and_turns_fp8_off(caplog, monkeypatch):
    monkeypatch.setattr(fp8_module, "_warned_fallback", False)
    model = ModelConfig(**SIX_LAYERS, fp8="e4m3", fp8_param=True, fp8_fallback="bf16")
    with caplog.at_level(logging.WARNING, logger="caopd_megatron.models.fp8"):
        assert fp8_transformer_kwargs(model, 1, te_usable=False) == {"fp8": None}
        assert fp8_transformer_kwargs(model, 1, te_usable=False) == {"fp8": None}
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1 and "runs without FP8 (params_dtype=bfloat16)" in warnings_logged[0].message


def test_config_keys_are_typed_and_checked():
    cfg = load_config(overrides=["model.fp8=hybrid", "model.fp8_recipe=blockwise", "model.fp8_param=true",
                                 "model.fp8_layers_at_start_in_bf16=1", "model.fp8_teacher=true",
                                 "model.fp8_fallback=bf16"])
    m = cfg.model
    assert (m.fp8, m.fp8_recipe, m.fp8_param, m.fp8_layers_at_start_in_bf16, m.fp8_teacher, m.fp8_fallback) == (
        "hybrid", "blockwise", True, 1, True, "bf16")
    defaults = load_config().model
    assert (defaults.fp8, defaults.fp8_recipe, defaults.fp8_fallback, defaults.fp8_teacher) == (
        None, "delayed", "error", False)
    with pytest.raises(ConfigError, match="model.fp8_recipe"):
        load_config(overrides=["model.fp8_recipe=current"])
    with pytest.raises(ConfigError, match="model.fp8_fallback"):
        load_config(overrides=["model.fp8_fallback=fp16"])
    with pytest.raises(ConfigError, match="fp8_layers_at_end_in_bf16"):
        load_config(overrides=["model.fp8_layers_at_end_in_bf16=two"])


def test_builder_without_te_errors_or_falls_back(runtime, monkeypatch):
    """End to end through ``build_gpt_model`` without a usable TE: error, or a bf16 model."""
    if runtime.transformer_engine:
        pytest.skip("Transformer Engine is usable here (tests/test_gpu.py runs FP8 instead)")
    monkeypatch.setattr(fp8_module, "_warned_fallback", False)
    with pytest.raises(BackendError, match="model.fp8=e4m3 needs Transformer Engine"):
        tiny_model(fp8="e4m3")
    model, _ = tiny_model(fp8="e4m3", fp8_fallback="bf16")
    assert model.config.fp8 is None
    reference, _ = tiny_model()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name  # same seed, same model: the fallback changes nothing else
