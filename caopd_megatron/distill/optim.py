"""Optimizer, learning-rate schedule and model-parallel-aware gradient clipping.

Design decisions:
- AdamW with linear warm-up then cosine decay to ``min_lr`` (or constant). The schedule is ``LRSchedule``, a
  small object that writes ``lr`` into ``optimizer.param_groups``: it needs no ``torch.optim.Optimizer`` (so
  it drives megatron-core's distributed optimizer too, see ``parallel/distributed_optimizer.py``), and its
  state is a plain dict with ``LambdaLR``'s keys (``last_epoch``, ``base_lrs``), so checkpoints written with
  the former ``LambdaLR`` load unchanged.
- ``build_optimizer`` is the one place that picks the optimizer: torch AdamW over fp32 parameters,
  ``MasterWeightAdamW`` when any parameter is 16-bit, or, for a student wrapped for megatron's distributed optimizer (``parallel.use_distributed_optimizer``
  with DP > 1), that optimizer behind the same small interface. ``optimizer_step`` is the one place that
  clips, steps and advances the schedule; megatron's optimizer clips inside its own step (norm over all
  ranks, each holding other shards), so ``clip_grad_norm`` below is then not applied a second time.
- 16-bit parameters get fp32 master weights (``MasterWeightAdamW``): AdamW applied to a bf16 tensor directly
  rounds every update to bf16, and an update below half a bf16 ulp of the weight (2^-9 relative: a step of
  lr 1e-6 on any weight above ~5e-4) is lost entirely, so a bf16 run at the 70B config's lr would silently
  not train. The fp32 copy and fp32 moments live in the optimizer state *of the model parameter*
  (``main_param``, ``exp_avg``, ``exp_avg_sq``, all parameter-shaped), so per-rank and distributed checkpoints
  store and re-shard them like any elementwise state. megatron's distributed optimizer keeps its own fp32
  main weights.
- Gradient clipping computes the global norm over the whole model: squared norms of this rank's shards are
  summed over the model-parallel group (TP x PP), counting TP-duplicated parameters (norms, replicated
  biases) on one TP rank only, and the last pipeline stage's copy of a tied word embedding (megatron marks it
  ``shared``) not at all. Every rank then scales by the same factor, so TP/PP runs clip exactly like a
  single process. Data-parallel replicas hold identical (already reduced) gradients and are not summed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from caopd_megatron.config.schema import OptimConfig
from caopd_megatron.runtime.guard import check_finite_update


def build_optimizer(model_or_params, cfg: OptimConfig, lr: float | None = None):
    """AdamW (``lr`` overrides ``cfg.lr``) over a model's or an iterable's trainable parameters.

    A student wrapped by ``wrap_student(..., distributed_optimizer=True)`` gets megatron-core's distributed
    optimizer (``DistributedAdamW``); anything else a ``torch.optim.AdamW``.
    """
    if isinstance(model_or_params, torch.nn.Module):
        from caopd_megatron.parallel.data_parallel import uses_distributed_optimizer

        if uses_distributed_optimizer(model_or_params):
            from caopd_megatron.parallel.distributed_optimizer import DistributedAdamW

            return DistributedAdamW(model_or_params, cfg, lr)
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


def optimizer_step(model, optimizer, scheduler, max_norm: float, loss: float | None = None) -> tuple[float, float]:
    """Clip the global gradient norm to ``max_norm`` (0 = no clipping), step the optimizer, advance the
    schedule. Returns (gradient norm before clipping, the learning rate this step used).

    A non-finite gradient norm or ``loss`` (the step's loss, the same on every rank) raises
    ``TrainingDivergedError`` before the optimizer applies anything. An optimizer with ``clip_and_step``
    (megatron's distributed optimizer) clips inside its step.
    """
    if hasattr(optimizer, "clip_and_step"):
        norm = optimizer.clip_and_step(max_norm, loss)
    else:
        norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_norm)
        check_finite_update(norm, loss)
        optimizer.step()
    lr = float(optimizer.param_groups[0]["lr"])
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


def _is_tp_duplicate(p: torch.nn.Parameter) -> bool:
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return False
    return not getattr(p, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_rank() > 0


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip gradients in place to a global L2 norm of ``max_norm``; returns the norm before clipping."""
    from megatron.core import parallel_state

    grads = [p.grad for p in params if p.grad is not None]
    # ``shared``: the last stage's duplicate of a tied embedding under PP; its twin on stage 0 is counted.
    counted = [p.grad for p in params if p.grad is not None and not _is_tp_duplicate(p)
               and not getattr(p, "shared", False)]
    sq = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g in counted:
        sq += g.detach().float().pow(2).sum()
    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        # Sum of squared norms over every shard of the model (TP x PP), not over data-parallel replicas.
        dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    norm = float(sq.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        torch._foreach_mul_(grads, scale)
    return norm
