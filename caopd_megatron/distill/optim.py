"""Optimizers, learning-rate schedule and model-parallel gradient clipping behind one step protocol.

Design decisions:
- ``TrainingOptimizer`` is what the step calls: ``step_with_clipping(max_norm) -> (norm, lr)``. A torch
  optimizer becomes one through ``LocalOptimizer`` (clipping over the model's groups, then its ``step()``);
  megatron's ``DistributedAdamW`` is one already (it clips inside its step). ``training_optimizer`` picks.
- ``build_optimizer`` is the one place that picks the kind: torch AdamW for fp32, ``MasterWeightAdamW`` when
  any parameter is 16-bit (AdamW on bf16 weights loses every update below half an ulp), megatron's
  distributed optimizer for a student wrapped for it.
- ``LRSchedule`` writes ``lr`` into any ``param_groups`` (torch or megatron); its state has ``LambdaLR``'s keys.
- Clipping sums squared norms over the model-parallel group (TP x PP), counting TP-replicated parameters on
  TP rank 0 only and a tied embedding's last-stage copy (``shared``) not at all: TP/PP clip exactly like one
  process. DP replicas hold identical reduced gradients and are not summed.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from caopd_megatron.config.schema import OptimConfig
from caopd_megatron.parallel.data_parallel import model_groups, uses_distributed_optimizer
from caopd_megatron.parallel.distributed_optimizer import DistributedAdamW

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


class TrainingOptimizer(Protocol):
    """What the training step needs from an optimizer, whatever its kind (``training_optimizer`` gives it).

    ``param_groups``: dicts with ``lr`` (what ``LRSchedule`` writes); ``step_with_clipping(max_norm)``: clip
    the global gradient norm to ``max_norm`` (0 = off), update the parameters, and return the norm before
    clipping and the learning rate used. Checkpoints talk to the optimizer itself (``state_dict``,
    ``load_state_dict`` and, for ``DistributedAdamW``, its sharded-state methods).
    """

    param_groups: list[dict]

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step_with_clipping(self, max_norm: float) -> tuple[float, float]: ...


class LocalOptimizer:
    """A torch optimizer (AdamW, ``MasterWeightAdamW``, any other) over full gradients, as a
    ``TrainingOptimizer``: model-parallel clipping (``clip_grad_norm`` over ``groups``), then its ``step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 groups: ProcessGroupCollection | None) -> None:
        self.optimizer, self.params, self.groups = optimizer, params, groups

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step_with_clipping(self, max_norm: float) -> tuple[float, float]:
        norm = clip_grad_norm(self.params, max_norm, self.groups)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        return norm, lr


def training_optimizer(model, optimizer) -> TrainingOptimizer:
    """``optimizer`` as the step's ``TrainingOptimizer``: megatron's (``DistributedAdamW``) is one already; a
    torch optimizer is wrapped with ``model``'s trainable parameters and process groups."""
    if isinstance(optimizer, DistributedAdamW):
        return optimizer
    return LocalOptimizer(optimizer, [p for p in model.parameters() if p.requires_grad], model_groups(model))


def build_optimizer(model_or_params, cfg: OptimConfig, lr: float | None = None):
    """AdamW (``lr`` overrides ``cfg.lr``) over a model's or an iterable's trainable parameters.

    A student wrapped by ``wrap_student(..., distributed_optimizer=True)`` gets megatron-core's distributed
    optimizer (``DistributedAdamW``); anything else a ``torch.optim.AdamW`` (``MasterWeightAdamW`` for 16-bit
    parameters).
    """
    if isinstance(model_or_params, torch.nn.Module):
        if uses_distributed_optimizer(model_or_params):
            return DistributedAdamW(model_or_params, cfg, lr, init_state=init_adam_state)
        model_or_params = model_or_params.parameters()
    params = [p for p in model_or_params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    half = any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    cls = MasterWeightAdamW if half else torch.optim.AdamW
    return cls(params, lr=cfg.lr if lr is None else lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
               weight_decay=cfg.weight_decay)


def _fresh_adam_state(p: torch.Tensor, dtype: torch.dtype, amsgrad: bool = False) -> dict:
    """AdamW's state at step 0 for ``p``: zero moments (``dtype``), step 0."""
    st = {"step": torch.zeros((), dtype=torch.float32),
          "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
          "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}
    if amsgrad:
        st["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    return st


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose 16-bit parameters are updated through fp32 master weights (fp32 ones as in torch's AdamW).

    Per 16-bit parameter ``p``, ``state[p]`` holds ``main_param`` (fp32 copy of ``p``), ``exp_avg`` and
    ``exp_avg_sq`` (fp32), ``step``. A step applies decoupled weight decay and the bias-corrected Adam update
    to ``main_param`` with ``p.grad`` in fp32, then writes ``main_param`` rounded into ``p``. Parameter groups,
    hyper-parameters and ``state_dict`` are torch's.
    """

    def init_state(self, p: torch.nn.Parameter) -> dict:
        """The step-0 state of ``p`` (zero moments; fp32 master copy for a 16-bit ``p``)."""
        st = self.state[p]
        if not st:
            st.update(_fresh_adam_state(p, torch.float32))
            if p.dtype != torch.float32:
                st["main_param"] = p.detach().float().clone(memory_format=torch.preserve_format)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, except that fp32 state stays fp32 (torch casts every floating state tensor to its
        parameter's dtype, which would round the master weights and moments to bf16)."""
        kept = {pid: {k: v for k, v in st.items() if k != "step" and torch.is_tensor(v)}
                for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(ids, params):
            for key, value in kept.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise NotImplementedError("MasterWeightAdamW implements plain AdamW (no amsgrad / maximize)")
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.init_state(p)
                master = st.get("main_param", p)
                grad = p.grad.float()
                st["step"] += 1
                t = float(st["step"])
                master.mul_(1 - lr * wd)
                st["exp_avg"].lerp_(grad, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                master.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
                if master is not p:
                    p.copy_(master)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig, base_lr: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets ``lr = base_lr * lr_multiplier(last_epoch)`` on every group of ``optimizer.param_groups``.

    ``base_lrs`` are the groups' learning rates at construction; ``last_epoch`` counts ``step()`` calls
    (optimizer steps taken). Works with anything that has ``param_groups`` (torch or megatron optimizers).
    """

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_multiplier(self.last_epoch, self.total_steps, self.cfg, base)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Accepts this class's state and a ``LambdaLR`` state dict (same keys, plus some it ignores)."""
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self._apply()


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> LRSchedule:
    return LRSchedule(optimizer, cfg, total_steps)


def optimizer_step(model, optimizer, scheduler, max_norm: float) -> tuple[float, float]:
    """Clip the global gradient norm to ``max_norm`` (0 = no clipping), step the optimizer, advance the
    schedule. Returns (gradient norm before clipping, the learning rate this step used)."""
    norm, lr = training_optimizer(model, optimizer).step_with_clipping(max_norm)
    if scheduler is not None:
        scheduler.step()
    return norm, lr


def init_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter without state AdamW's state at step 0 (zero moments): what a fresh AdamW
    creates on its first step, so the optimizer behaves the same; checkpoint loading reads into these."""
    own = getattr(optimizer, "init_state", None)  # MasterWeightAdamW: fp32 moments and master weights
    for group in optimizer.param_groups:
        for p in group["params"]:
            if own is not None:
                own(p)
            elif not optimizer.state[p]:
                optimizer.state[p] = _fresh_adam_state(p, p.dtype, bool(group.get("amsgrad")))


def clip_grad_norm(params, max_norm: float, groups: ProcessGroupCollection | None = None) -> float:
    """Clip gradients in place to a global L2 norm of ``max_norm``; returns the norm before clipping.

    ``groups``: the model's process groups; the squared norm is summed over their model-parallel group (TP x
    PP), counting TP-replicated parameters on TP rank 0 only. ``None``: these parameters are the whole model.
    """
    tp_duplicate = groups is not None and groups.tp.rank() > 0
    grads = [p.grad for p in params if p.grad is not None]
    # ``shared``: the last stage's duplicate of a tied embedding under PP; its twin on stage 0 is counted.
    counted = [p.grad for p in params if p.grad is not None and not getattr(p, "shared", False)
               and not (tp_duplicate and not getattr(p, "tensor_model_parallel", False))]
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in counted:
        sq += g.detach().float().pow(2).sum()
    if groups is not None and groups.mp.size() > 1:
        # Sum of squared norms over every shard of the model (TP x PP), not over data-parallel replicas.
        dist.all_reduce(sq, group=groups.mp)
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        torch._foreach_mul_(grads, scale)
    return norm
