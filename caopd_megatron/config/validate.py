"""Value ranges of every numeric config key, checked once at load time (types are the loader's job).

Design decisions:
- One table, ``RANGES``: key -> ``Range``. A key missing from the table has no numeric constraint (strings,
  booleans, choices). ``teacher.model.*`` reuses the ``model.*`` rows. ``None`` (an unset optional) passes.
- Cross-key rules (``CROSS_RULES``) are predicates over the whole config with the message to show.
- ``out_of_range(cfg)`` returns one line per violation naming the key, the value and the allowed range; the
  loader raises the first as a ``ConfigError``, so ``temperature=-1`` stops the job at start-up instead of
  deep inside sampling.
- ``checkpoint.keep_last`` accepts 0 (documented: keep every checkpoint); negatives are refused.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from caopd_megatron.config.schema import CaOPDConfig


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is excluded
    high_open: bool = False

    def holds(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)

_MODEL = {
    "num_layers": AT_LEAST_1, "hidden_size": AT_LEAST_1, "num_attention_heads": AT_LEAST_1,
    "num_query_groups": AT_LEAST_1, "ffn_hidden_size": AT_LEAST_1, "kv_channels": AT_LEAST_1,
    "vocab_size": AT_LEAST_1, "make_vocab_size_divisible_by": AT_LEAST_1, "max_position_embeddings": Range(2),
    "rotary_base": POSITIVE, "rope_scaling_factor": POSITIVE, "norm_epsilon": POSITIVE,
    "init_method_std": NON_NEGATIVE,
}
RANGES: dict[str, Range] = {
    **{f"model.{k}": r for k, r in _MODEL.items()},
    **{f"teacher.model.{k}": r for k, r in _MODEL.items()},
    "parallel.tensor_model_parallel_size": AT_LEAST_1, "parallel.pipeline_model_parallel_size": AT_LEAST_1,
    "parallel.ddp_bucket_size": AT_LEAST_1,
    "teacher.ema_rate": UNIT, "teacher.replay_fraction": UNIT,
    "task.min_digits": AT_LEAST_1, "task.max_digits": AT_LEAST_1, "task.n_train": AT_LEAST_1,
    "task.n_eval": AT_LEAST_1,
    "warmup.steps": NON_NEGATIVE, "warmup.batch_size": AT_LEAST_1, "warmup.lr": NON_NEGATIVE,
    "warmup.teacher_format_fraction": UNIT, "warmup.wrong_demo_fraction": UNIT, "warmup.note_fraction": UNIT,
    "warmup.soft_target_sigma": POSITIVE,
    "rollout.samples_per_prompt": AT_LEAST_1, "rollout.prompts_per_step": AT_LEAST_1,
    "rollout.temperature": POSITIVE, "rollout.top_p": Range(0, 1, low_open=True), "rollout.top_k": NON_NEGATIVE,
    "rollout.max_new_tokens": AT_LEAST_1, "rollout.batch_size": AT_LEAST_1,
    "rollout.pipeline_microbatches": NON_NEGATIVE,
    "calibration.precision": Range(0, 6),
    "distill.beta": UNIT, "distill.temperature": POSITIVE, "distill.skip_first_tokens": NON_NEGATIVE,
    "distill.chunk_size": AT_LEAST_1, "distill.micro_batch_size": AT_LEAST_1, "distill.steps": NON_NEGATIVE,
    "distill.grad_clip": NON_NEGATIVE, "distill.collapse_loss": NON_NEGATIVE,
    "distill.collapse_grad_norm": NON_NEGATIVE, "distill.collapse_steps": NON_NEGATIVE,
    "optim.lr": NON_NEGATIVE, "optim.min_lr": NON_NEGATIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": Range(0, 1, high_open=True), "optim.beta2": Range(0, 1, high_open=True), "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "evaluation.max_new_tokens": AT_LEAST_1, "evaluation.batch_size": AT_LEAST_1, "evaluation.n_bins": AT_LEAST_1,
    "checkpoint.save_interval": NON_NEGATIVE, "checkpoint.keep_last": NON_NEGATIVE,
    "logging.log_interval": NON_NEGATIVE,
    "run.threads": NON_NEGATIVE, "run.max_steps_per_job": NON_NEGATIVE,
}

CROSS_RULES: list[tuple[Callable[[CaOPDConfig], bool], str]] = [
    (lambda c: c.task.min_digits <= c.task.max_digits,
     "task.min_digits={c.task.min_digits} exceeds task.max_digits={c.task.max_digits}"),
]


def _lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    node = cfg
    for part in key.split("."):
        if node is None or not dataclasses.is_dataclass(node):
            return False, None
        node = getattr(node, part)
    return True, node


def out_of_range(cfg: CaOPDConfig) -> list[str]:
    """One message per config value outside its allowed range (empty when everything is in range)."""
    problems = []
    for key, allowed in RANGES.items():
        found, value = _lookup(cfg, key)
        if found and value is not None and not allowed.holds(value):
            problems.append(f"key '{key}': {value!r} is out of range (must be {allowed.describe()})")
    problems += [message.format(c=cfg) for holds, message in CROSS_RULES if not holds(cfg)]
    return problems
