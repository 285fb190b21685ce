"""megatron-core's ``DistributedOptimizer`` (Adam state and fp32 main weights sharded over DP) behind the
step's ``TrainingOptimizer`` protocol (``distill/optim.py``), the LR schedule and the checkpoints.

Design decisions (long form: ``docs/design.md``, "Distributed optimizer"):
- Built by megatron's ``get_megatron_optimizer`` over the model's process groups for a student wrapped with
  ``use_distributed_optimizer=True``; ``OptimConfig`` maps one to one (AdamW, decoupled weight decay on every
  parameter: ``config_overrides={}``); 16-bit models get fp32 main weights, fp16 a constant loss scale of 1.
- Clipping follows megatron's step, split open (``prepare_grads`` -> global norm -> clip ->
  ``step_with_ready_grads``) so a non-finite norm or ``found_inf`` stops the step before the update
  (``runtime/guard.py``); the norm is summed over all ranks (each holds other ranges), the step reports it,
  and nothing clips a second time.
- Checkpoints: per-rank files hold this rank's ranges as they sit in the buffers (``state_dict``, no
  communication); the distributed copy is megatron's ``fully_reshardable`` sharded state (any layout).
  megatron's loader shares one ``step`` tensor between parameters of torch's AdamW: un-shared on load.
- AdamW's step-0 state comes from the caller (``init_state``), so this module needs nothing from ``distill``.
"""
from __future__ import annotations

import logging

from typing import Callable

import torch

from caopd_megatron.config.schema import OptimConfig
from caopd_megatron.parallel.data_parallel import model_groups, unwrap
from caopd_megatron.runtime.guard import check_finite_update

log = logging.getLogger(__name__)

FORMAT = "megatron_distributed_optimizer"
PER_RANK = "dp_reshardable"  # megatron's name for this rank's buffer ranges as they are (per-rank files)
RESHARDABLE = "fully_reshardable"  # parameter-shaped tensors, any layout (the distributed copy)


class DistributedAdamW:
    """AdamW sharded over the data-parallel group (megatron-core ``DistributedOptimizer``).

    ``param_groups``: the inner optimizer's groups (what ``LRSchedule`` sets ``lr`` on); their parameters
    are this rank's main-parameter ranges, 1-D ``[n]`` tensors (fp32) of this TP/PP shard, disjoint across
    the DP group. ``step_with_clipping`` and ``sharded_state_dict`` are collective (every rank of the job);
    ``state_dict``/``load_state_dict`` are local to the rank.
    """

    def __init__(self, model, cfg: OptimConfig, lr: float | None = None,
                 init_state: Callable[[torch.optim.Optimizer], None] | None = None) -> None:
        """``init_state``: gives a torch optimizer's parameters AdamW's step-0 state (``distill.optim``'s
        ``init_adam_state``), applied to megatron's inner optimizer before its state is saved or loaded."""
        import megatron.core.optimizer as mopt

        dtype = unwrap(model).config.params_dtype
        self.config = mopt.OptimizerConfig(
            optimizer="adam", lr=cfg.lr if lr is None else lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.eps, decoupled_weight_decay=True,
            clip_grad=0.0, use_distributed_optimizer=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16, loss_scale=1.0 if dtype == torch.float16 else None)
        self.model, self.init_state = model, init_state
        self.megatron = mopt.get_megatron_optimizer(self.config, [model], config_overrides={},
                                                    use_gloo_process_groups=False, pg_collection=model_groups(model))
        if len(self.megatron.chained_optimizers) != 1:  # a second one would hold expert (MoE) parameters
            raise NotImplementedError("the distributed optimizer is wired for dense models (one optimizer)")
        self._dist = self.megatron.chained_optimizers[0]
        inner = "torch.optim.AdamW (Transformer Engine / apex absent)" if mopt.USING_PYTORCH_OPTIMIZER else "fused Adam"
        log.info("megatron-core DistributedOptimizer over %s: %d of %d optimizer-state elements on this DP rank",
                 inner, self.local_state_numel(), sum(p.numel() for p in model.parameters() if p.requires_grad))

    # ---- the optimizer interface of the steps and the LR schedule

    @property
    def param_groups(self) -> list[dict]:
        return self.megatron.param_groups

    def local_state_numel(self) -> int:
        """Elements of this rank's main-parameter ranges (each has an ``exp_avg`` and ``exp_avg_sq`` of its size)."""
        return sum(p.numel() for g in self.param_groups for p in g["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.megatron.zero_grad(set_to_none)

    def step_with_clipping(self, max_norm: float, loss: float | None = None) -> tuple[float, float]:
        """Clip to ``max_norm`` (0 = off), update this rank's ranges, all-gather the parameters over DP;
        returns the global gradient norm before clipping (the same float on every rank) and the lr used. Raises
        ``TrainingDivergedError`` before any update when the gradients (``found_inf``), their norm or ``loss``
        are not finite."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self._dist.config.clip_grad = max(0.0, float(max_norm))
        lr = float(self.param_groups[0]["lr"])
        found_inf = self.megatron.prepare_grads()  # model grads -> main grads (unscaled), found_inf over the group
        norm = float("nan") if found_inf else float(self.megatron.get_grad_norm())
        check_finite_update(norm, loss)
        if max_norm > 0 and not self._dist.is_stub_optimizer:
            clip_grad_by_total_norm_fp32(
                self._dist.get_parameters(), max_norm=max_norm, total_norm=norm,
                use_decoupled_grad=self._dist.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.megatron.step_with_ready_grads()
        return norm, lr

    # ---- checkpoints

    def _ensure_state(self) -> None:
        if not self._dist.is_stub_optimizer and self.init_state is not None:
            self.init_state(self._dist.optimizer)

    def state_dict(self) -> dict:
        """This rank's complete state, plain tensors, no communication: ``{"format", "common", "param_state"}``.

        ``common``: megatron's ``state_dict()`` (parameter groups with the Adam step); ``param_state``: its
        ``get_parameter_state_dp_reshardable()``, per buffer, dtype and bucket the list of this rank's
        parameter ranges, each ``{"param", "exp_avg", "exp_avg_sq": [n], "step", "gbuf_local_start/end",
        "padding": False}`` (``[n]``: the range's element count; ``padding`` is the flag megatron's own
        reader expects, which its sharded writer adds).
        """
        self._ensure_state()
        param_state = self._dist.get_parameter_state_dp_reshardable()
        for gbuf_idx in range(len(self._dist.gbuf_ranges)):
            for buckets in param_state[gbuf_idx].values():
                for bucket in buckets:
                    for i, entry in enumerate(bucket):
                        # Clones: the main parameters of fp32 models are views of the whole param buffer.
                        bucket[i] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in entry.items()}
                        bucket[i]["padding"] = False
        return {"format": FORMAT, "common": self.megatron.state_dict(), "param_state": param_state}

    def check_state_dict(self, saved) -> None:
        """Raise ``ValueError`` naming the mismatch if ``saved`` (a ``state_dict()``) cannot load here."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError("optimizer state was written by a torch optimizer, but this run uses megatron's "
                             "distributed optimizer (parallel.use_distributed_optimizer=true with DP > 1): "
                             "resume with the setting the checkpoint was written with")
        for key in ("per_bucket_numel", "per_bucket_numel_unpadded"):
            if saved["param_state"].get(key) != getattr(self._dist, key):
                raise ValueError(f"distributed-optimizer buffers differ: {key} is {saved['param_state'].get(key)} "
                                 f"in the checkpoint but {getattr(self._dist, key)} in this run")

    @torch.no_grad()  # fp32 main parameters are views of the (grad-requiring) model parameters
    def load_state_dict(self, saved: dict) -> None:
        self.check_state_dict(saved)
        self._ensure_state()
        self.megatron.load_state_dict({**saved["common"], "param_state": saved["param_state"],
                                       "param_state_sharding_type": PER_RANK})
        self._unshare_steps()

    def _unshare_steps(self) -> None:
        """megatron's ``load_state_dict`` gives every parameter of torch's AdamW the *same* ``step`` tensor;
        AdamW increments each parameter's step in place, so a shared one would advance once per parameter
        per step (wrong bias correction after a resume). Each parameter gets its own copy."""
        for st in self._dist.optimizer.state.values():
            if "step" in st:
                st["step"] = st["step"].clone()

    def sharded_state_dict(self, model_sharded: dict, is_loading: bool = False) -> dict:
        """megatron's ``fully_reshardable`` state for ``dist_checkpointing``: per parameter, tensors of the
        parameter's (local shard's) shape under ``optimizer.state.{param,exp_avg,exp_avg_sq}.<its key>``,
        gathered over DP when saving (collective); ``model_sharded`` is the student's ``sharded_state_dict``."""
        self._ensure_state()
        return self.megatron.sharded_state_dict(model_sharded, is_loading=is_loading,
                                                metadata={"distrib_optim_sharding_type": RESHARDABLE})

    @torch.no_grad()
    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Restore from what ``dist_checkpointing.load`` returned for ``sharded_state_dict(..., is_loading=True)``.

        Two calls instead of megatron's one ``load_state_dict``: its ``fully_reshardable`` reader copies every
        per-parameter state entry of the inner optimizer, which for torch's AdamW (the fallback without TE /
        apex) includes a ``step`` the checkpoint does not hold per parameter (it is in the parameter groups,
        restored by the first call); the steps are set aside while the ranges are read.
        """
        self.megatron.load_state_dict({k: v for k, v in loaded.items()
                                       if k not in ("param_state", "param_state_sharding_type")})
        state = self._dist.optimizer.state
        steps = {p: st.pop("step") for p, st in state.items() if "step" in st}
        try:
            self._dist.load_parameter_state_from_fully_reshardable(loaded["param_state"])
        finally:
            for p, step in steps.items():
                state[p]["step"] = step
            self._unshare_steps()
