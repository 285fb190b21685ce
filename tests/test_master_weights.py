"""Checks ``distill.optim.MasterWeightAdamW``: AdamW for 16-bit parameters through fp32 master weights.

Reference: ``torch.optim.AdamW`` on fp32 copies of the parameters fed the same gradients (the bf16 gradients
cast to fp32). The master weights must follow it to fp32 rounding and the bf16 parameters must be exactly
the reference rounded to bf16, including at a learning rate whose updates torch's AdamW applied to the bf16
tensors directly loses to rounding (the failure this optimizer exists for).
"""
from __future__ import annotations

import pytest

import torch

from caopd_megatron.config.schema import OptimConfig
from caopd_megatron.distill.optim import MasterWeightAdamW, build_optimizer, init_adam_state
from helpers_models import runtime  # noqa: F401  (a fixture)

KW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(16, 8, generator=g) * 0.5 + 1.0).to(dtype)),
            torch.nn.Parameter((torch.randn(8, generator=g) * 0.02).to(dtype))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=g) * 0.1).to(p.dtype) for p in params]


def _run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("lr", [1e-3, 1e-6])
def test_bf16_parameters_follow_the_fp32_reference(lr):
    ours = _params(torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    opt, ref_opt = MasterWeightAdamW(ours, lr=lr, **KW), torch.optim.AdamW(ref, lr=lr, **KW)
    for step in range(30):
        for p, r, g in zip(ours, ref, _grads(ours, step)):
            p.grad, r.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        master = opt.state[p]["main_param"]
        assert master.dtype == torch.float32 and opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(master, r.detach(), rtol=1e-6, atol=1e-9)
        assert torch.equal(p.detach(), r.detach().to(torch.bfloat16))
    if lr == 1e-6:
        # torch's AdamW on the bf16 tensors themselves: the big weights' updates all round away.
        naive = _params(torch.bfloat16)
        start = naive[0].detach().clone()
        _run(torch.optim.AdamW(naive, lr=lr, **KW), naive, 30)
        assert torch.equal(naive[0].detach(), start)
        # The master weights kept them (random-sign gradients: a walk of 30 steps of ~lr each).
        moved = (opt.state[ours[0]]["main_param"] - start.float()).abs()
        assert float(moved.mean()) > lr


def test_fp32_parameters_match_torch_adamw():
    ours, ref = _params(torch.float32), _params(torch.float32)
    opt = MasterWeightAdamW(ours, lr=1e-2, **KW)
    _run(opt, ours, 10)
    _run(torch.optim.AdamW(ref, lr=1e-2, **KW), ref, 10)
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        assert "main_param" not in opt.state[p]


def test_state_dict_round_trip_keeps_fp32_state_and_resumes_exactly():
    params = _params(torch.bfloat16)
    opt = MasterWeightAdamW(params, lr=1e-4, **KW)
    _run(opt, params, 3)
    saved = {"state": {k: {n: v.clone() for n, v in st.items()} for k, st in opt.state_dict()["state"].items()},
             "param_groups": opt.state_dict()["param_groups"]}
    weights = [p.detach().clone() for p in params]
    _run(opt, params, 3, start=3)

    fresh = [torch.nn.Parameter(w.clone()) for w in weights]
    opt2 = MasterWeightAdamW(fresh, lr=1e-4, **KW)
    init_adam_state(opt2)  # what checkpoint loading does first: step-0 state to read into
    assert opt2.state[fresh[0]]["main_param"].dtype == torch.float32
    opt2.load_state_dict(saved)
    assert all(opt2.state[p]["main_param"].dtype == torch.float32 for p in fresh)
    _run(opt2, fresh, 3, start=3)
    for a, b in zip(params, fresh):
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(opt.state[a]["main_param"], opt2.state[b]["main_param"])


def test_build_optimizer_gives_16_bit_models_master_weights():
    cfg = OptimConfig(lr=1e-3)
    assert type(build_optimizer(_params(torch.bfloat16), cfg)) is MasterWeightAdamW
    assert type(build_optimizer(_params(torch.float16), cfg)) is MasterWeightAdamW
    assert type(build_optimizer(_params(torch.float32), cfg)) is torch.optim.AdamW


def test_checkpoints_keep_the_fp32_master_weights(runtime, tmp_path):
    """A bf16 student's master weights and moments survive the per-rank checkpoint and the distributed copy
    in fp32, bit for bit."""
    from caopd_megatron.checkpointing.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from caopd_megatron.checkpointing.distributed_checkpoint import load_distributed
    from helpers_models import tiny_model

    def fresh():
        model, _ = tiny_model(seed=3, params_dtype="bfloat16")
        return model, build_optimizer(model, OptimConfig(lr=1e-5))

    model, opt = fresh()
    params = [p for p in model.parameters() if p.requires_grad]
    _run(opt, params, 2)
    ckpt = save_checkpoint(tmp_path, 2, student=model, optimizer=opt, scheduler=None, teacher=None,
                           state=TrainState(2, {}), config_yaml="", distributed=True)
    half = [i for i, p in enumerate(params) if p.dtype == torch.bfloat16]  # megatron's local norms stay fp32
    assert len(half) >= len(params) // 2
    want = [opt.state[params[i]]["main_param"].clone() for i in half]
    assert all(w.dtype == torch.float32 for w in want)
    assert any(not torch.equal(w, params[i].detach().float()) for w, i in zip(want, half))  # finer than bf16
    for load in (lambda m, o: load_checkpoint(tmp_path, student=m, optimizer=o, scheduler=None, teacher=None),
                 lambda m, o: load_distributed(ckpt / "dist", student=m, optimizer=o)):
        model2, opt2 = fresh()
        load(model2, opt2)
        params2 = [p for p in model2.parameters() if p.requires_grad]
        for w, p in zip(want, [params2[i] for i in half]):
            got = opt2.state[p]["main_param"]
            assert got.dtype == torch.float32 and torch.equal(got, w)
            assert opt2.state[p]["exp_avg_sq"].dtype == torch.float32
