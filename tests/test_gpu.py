"""Checks on a CUDA device (marker ``gpu``; skipped without CUDA) against fp64 and CPU references.

- Losses: ``vocab_parallel_divergence`` and ``fused_chunked_divergence`` (every divergence, padded
  vocabulary, temperature) on bf16 CUDA tensors vs the fp64 ``torch.nn.functional`` reference of
  ``tests/test_losses.py`` on the same bf16 values: values and gradients.
- Sampler and one distillation step: ``tests/gpu_reference.py`` runs the scenario in a CPU process (CUDA
  hidden, the project's shims active) and saves its initial weights; here the same weights on CUDA give the
  same greedy and keyed-noise samples (tokens equal, log-probs within 1e-4) and, in fp32, the same loss,
  gradient norm and updated weights (unfused and fused loss).
- The CPU shims stay inactive when CUDA is present (``runtime/cpu_compat.py``).
- FP8 (only where Transformer Engine is usable, e.g. NVIDIA's container): an FP8 student's logits are bf16,
  within FP8 rounding of the bf16 teacher's with the same weights, and its loss has finite gradients.
``CAOPD_GPU_TESTS_ON_CPU=1`` runs the same tests on the CPU against the CPU process (``run.sh --dry-run``
uses it to exercise the code paths before a GPU is lent); the shim test is skipped there.
Unmarked: the builder asks for megatron's masked-softmax fusion only when its compiled extension imports.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_reference
from caopd_megatron.config.schema import ModelConfig, ParallelConfig
from caopd_megatron.distill.divergence_math import DIVERGENCES
from caopd_megatron.distill.divergence_options import DivergenceOptions
from caopd_megatron.distill.fused_output_loss import fused_chunked_divergence
from caopd_megatron.distill.losses import vocab_parallel_divergence
from caopd_megatron.models.builder import transformer_config
from caopd_megatron.models.fp8 import teacher_model_config
from caopd_megatron.models.teacher import copy_weights
from caopd_megatron.runtime import cpu_compat
from caopd_megatron.runtime.backend import Backend, detect_backend, fused_softmax_kernels_present
from helpers_models import init_runtime, tiny_model
from test_losses import assert_close, make_logits, reference_divergence, reference_with_grad, run

ON_CPU = os.environ.get("CAOPD_GPU_TESTS_ON_CPU") == "1"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def device():
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons need true fp32 matmuls
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs CUDA (CAOPD_GPU_TESTS_ON_CPU=1 runs these code paths on the CPU)")


@pytest.fixture(scope="module")
def cpu_reference(device, tmp_path_factory):
    """The scenario's results from a CPU process (CUDA hidden)."""
    out = tmp_path_factory.mktemp("gpu_reference") / "reference.pt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(TESTS / "gpu_reference.py"), str(out)], env=env, check=True, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def on_device(device, cpu_reference):
    """The scenario run here (on ``device``) from the CPU reference's initial weights."""
    init_runtime()
    return gpu_reference.run_scenario(cpu_reference)


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature,real", [(1.0, None), (1.7, 1900)])
def test_losses_bf16_match_fp64_reference(device, divergence, temperature, real):
    student = make_logits(48, 2048, seed=31, dtype=torch.bfloat16).to(device)
    teacher = make_logits(48, 2048, seed=32, dtype=torch.bfloat16).to(device)
    grad_out = torch.rand(48, generator=torch.Generator().manual_seed(33)).to(device)
    kw = dict(divergence=divergence, temperature=temperature, real_vocab_size=real)
    loss, grad = run(student, teacher, grad_out, **kw)
    assert loss.device.type == device.type and loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref_loss, ref_grad = reference_with_grad(student.cpu(), teacher.cpu(), grad_out.cpu(), kind=divergence,
                                             temperature=temperature, real_vocab_size=real)
    assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-6)  # fp32 arithmetic on the same bf16 values
    assert_close(grad.cpu(), ref_grad, rtol=1e-2, atol=1e-5)  # only the final cast to bf16 rounds
    if real is not None:
        assert torch.all(grad[:, real:] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_chunked_bf16_matches_fp64_reference(device, divergence):
    g = torch.Generator().manual_seed(41)
    tokens, hidden, vocab, real = 40, 64, 1024, 1000
    h_s, h_t = (torch.randn(tokens, 1, hidden, generator=g) for _ in range(2))
    w_s, w_t = (torch.randn(vocab, hidden, generator=g) * 0.25 for _ in range(2))
    h_s, h_t, w_s, w_t = (x.to(device=device, dtype=torch.bfloat16) for x in (h_s, h_t, w_s, w_t))
    leaf_h, leaf_w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    grad_out = torch.rand(tokens, 1, generator=g).to(device)
    loss = fused_chunked_divergence(leaf_h, leaf_w, h_t, w_t,
                                    DivergenceOptions(divergence, real_vocab_size=real, chunk_size=16))
    (loss * grad_out).sum().backward()
    # Reference: fp64 logits from the same bf16 hidden states and weights, autograd through the matmul.
    ref_h = h_s.cpu().double().requires_grad_()
    ref_w = w_s.cpu().double().requires_grad_()
    logits_t = h_t.cpu().double() @ w_t.cpu().double().t()
    ref = reference_divergence(ref_h @ ref_w.t(), logits_t, divergence, real_vocab_size=real)
    (ref * grad_out.cpu().double()).sum().backward()
    # The fused path's logits and logit gradients are bf16 (as an output layer's would be). On the same
    # bf16-rounded logits the loss is exact to fp32; against the fp64 logits it carries their rounding (2^-9
    # relative, ~0.2% of the loss here), and the gradients carry the bf16 logit gradients' (~1% in norm).
    with torch.no_grad():  # the same bf16 matmuls as the fused path's (16-token chunks, real rows)
        def chunked_logits(h, w):
            return torch.cat([h[i:i + 16, 0] @ w[:real].t() for i in range(0, tokens, 16)]).cpu().double()

        rounded = reference_divergence(chunked_logits(h_s, w_s), chunked_logits(h_t, w_t), divergence)
    assert_close(loss.cpu().squeeze(1), rounded, rtol=1e-5, atol=1e-6)
    assert_close(loss.cpu(), ref.detach(), rtol=2e-2, atol=2e-3)
    for actual, expected in ((leaf_h.grad, ref_h.grad), (leaf_w.grad, ref_w.grad)):
        error = torch.linalg.norm(actual.cpu().double() - expected) / torch.linalg.norm(expected)
        assert error < 3e-2, float(error)
    assert torch.all(leaf_w.grad[real:] == 0)


# ------------------------------------------------------------------------------------------------ sampler
@pytest.mark.gpu
@pytest.mark.parametrize("mode", sorted(gpu_reference.SAMPLING))
def test_sampler_on_device_matches_cpu(on_device, cpu_reference, mode):
    here, there = on_device["samples"][mode], cpu_reference["samples"][mode]
    assert [ids for ids, _ in here] == [ids for ids, _ in there]
    assert any(len(ids) > 1 for ids, _ in here)
    for (_, lp_here), (_, lp_there) in zip(here, there):
        torch.testing.assert_close(torch.tensor(lp_here), torch.tensor(lp_there), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ step
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_distillation_step_on_device_matches_cpu_fp32(on_device, cpu_reference, fused):
    here, there = on_device[f"step_fused={fused}"], cpu_reference[f"step_fused={fused}"]
    assert there["loss"] > 0 and there["grad_norm"] > 0
    assert here["loss"] == pytest.approx(there["loss"], rel=1e-5)
    assert here["grad_norm"] == pytest.approx(there["grad_norm"], rel=1e-4)
    moved = 0
    for name, after in there["weights"].items():
        torch.testing.assert_close(here["weights"][name], after, rtol=1e-4, atol=1e-5, msg=name)
        moved += int(not torch.equal(after, cpu_reference["student"][name]))
    assert moved == len(there["weights"])  # the step changed every tensor, on both sides


# ------------------------------------------------------------------------------------------------ shims
@pytest.mark.gpu
def test_cpu_shims_inactive_with_cuda(device):
    if device.type != "cuda":
        pytest.skip("a CUDA-only property")
    import megatron.core.transformer.utils as mcore_utils

    backend = detect_backend()
    assert backend.device == "cuda" and backend.cpu_shims == () and not cpu_compat.is_active()
    assert mcore_utils.torch is torch  # the literal-"cuda" modules see the real torch
    assert isinstance(torch.cuda.current_device(), int)
    assert torch.zeros(1).cuda().is_cuda  # Tensor.cuda is torch's own
    assert torch.cuda.get_rng_state().device.type == "cpu" and torch.cuda.get_rng_state().numel() != (
        torch.get_rng_state().numel())  # the CUDA generator's state, not the CPU generator's


# ------------------------------------------------------------------------------------------------ FP8
@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_student_through_transformer_engine(device, recipe):
    """Needs TE (NVIDIA's container): an FP8 student's logits stay bf16, are close to the bf16 model's with the
    same weights, and its loss against a bf16 teacher has finite, non-zero gradients."""
    backend = init_runtime()
    if not backend.transformer_engine:
        pytest.skip("Transformer Engine is not usable here (README, section FP8)")
    fp8 = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
               params_dtype="bfloat16", fp8="hybrid", fp8_recipe=recipe)
    student, vocab = tiny_model(seed=0, **fp8)
    teacher, _ = tiny_model(seed=0, **vars(teacher_model_config(ModelConfig(**fp8))))
    copy_weights(teacher, student)
    assert student.config.fp8 == "hybrid" and teacher.config.fp8 is None
    tokens = torch.randint(1, vocab.real, (2, 32), device=device)
    positions = torch.arange(32, device=device).expand(2, -1)
    s_logits = student(tokens, positions, attention_mask=None)
    with torch.no_grad():
        t_logits = teacher(tokens, positions, attention_mask=None)
    assert s_logits.dtype == t_logits.dtype == torch.bfloat16  # the loss reads bf16 logits
    error = torch.linalg.norm((s_logits - t_logits).float()) / torch.linalg.norm(t_logits.float())
    assert 0 < error < 0.1, float(error)  # FP8 GEMMs change the logits, by FP8 rounding only
    loss = vocab_parallel_divergence(s_logits, t_logits, DivergenceOptions(real_vocab_size=vocab.real)).mean()
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ config
def test_masked_softmax_fusion_only_with_its_extension():
    """pip's megatron-core has no compiled softmax: asking for the fusion on a GPU would fail at the first
    bf16 forward (``import scaled_masked_softmax_cuda`` inside megatron)."""
    gpu = Backend(device="cuda", megatron_version="-", transformer_engine=False, apex=False)
    config = transformer_config(ModelConfig(params_dtype="bfloat16"), ParallelConfig(), gpu)
    assert config.masked_softmax_fusion is fused_softmax_kernels_present()
    assert config.bias_activation_fusion is True  # the torch-level fusions stay on
    try:
        import scaled_masked_softmax_cuda  # noqa: F401
    except ImportError:
        assert config.masked_softmax_fusion is False
